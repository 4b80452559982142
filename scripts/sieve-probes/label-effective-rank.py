import sys, math, torch
from eigenguard.store import ResultStore
from eigenguard.experiment import RunConfig, load_run_attack, load_run_splits, poison_training_set, build_model
from eigenguard.analysis.capture import capture_features
store = ResultStore("results/results.sqlite")
prefix, point = sys.argv[1], sys.argv[2]
epochs = [int(e) for e in sys.argv[3].split(",")]
n = int(sys.argv[4])
run = store.find_runs(prefix)[0]
config = RunConfig.from_dict(run.config)
splits = load_run_splits(run, None)[1]
attack = load_run_attack(store, run)
poisoned = poison_training_set(attack, config, splits.train)
idx = torch.randperm(len(poisoned.data), generator=torch.Generator().manual_seed(0))[:n]
images = poisoned.data.images[idx]; labels = poisoned.data.labels[idx]
kept = run.extra["epoch_checkpoints"]
defense = config.build_defense()
def erank(cov):
    e = torch.linalg.eigvalsh(cov).clamp(min=0); p = e / e.sum(); p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))
for epoch, path in zip(kept["epochs"], kept["files"]):
    if epoch not in epochs: continue
    model = defense.prepare_model(build_model(config, splits.train))
    model.load_state_dict(store.read_tensors(path, "x", run.key))
    f = capture_features(model, images, splits.train, points={point: (getattr(model, point), "out")})[point].double()
    for m in (128, 512):
        P = torch.randn(f.shape[1], m, generator=torch.Generator().manual_seed(1), dtype=torch.float64) / math.sqrt(m)
        res = []
        for c in range(10):
            r = f[labels == c] @ P; r = r - r.mean(0)
            res.append(erank(r.T @ r / len(r)))
        res = torch.tensor(res); o = res[1:]
        print(f"epoch {epoch} {point} m={m}: target {res[0]:.1f} others max {o.max():.1f} median {o.median():.1f} -> {res[0]/o.max():.2f}", [round(x) for x in res.tolist()])
