import sys, math, torch
import torch.nn.functional as F
from eigenguard.store import ResultStore
from eigenguard.experiment import RunConfig, load_run_attack, load_run_splits, poison_training_set, build_model
from eigenguard.analysis.signatures import top_direction, two_means_split
from eigenguard.train import model_input
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
images = poisoned.data.images[idx]; labels = poisoned.data.labels[idx]; bad = poisoned.is_poisoned[idx]
kept = run.extra["epoch_checkpoints"]
defense = config.build_defense()
for epoch, path in zip(kept["epochs"], kept["files"]):
    if epoch not in epochs: continue
    model = defense.prepare_model(build_model(config, splits.train))
    model.load_state_dict(store.read_tensors(path, "x", run.key)); model.eval()
    feats, logits = [], []
    h = getattr(model, point).register_forward_hook(lambda m, a, o: feats.append(o.flatten(1).double()))
    with torch.no_grad():
        for s in range(0, n, 256):
            logits.append(model(model_input(images[s:s+256], splits.train)))
    h.remove()
    f = torch.cat(feats); lg = torch.cat(logits)
    loss = F.cross_entropy(lg, labels, reduction="none").double()
    out = []
    for c in range(10):
        m = labels == c
        coord, _ = top_direction(f[m]); up = two_means_split(coord)
        la, lb = loss[m][up], loss[m][~up]
        pooled = math.sqrt((la.var() * len(la) + lb.var() * len(lb)) / m.sum())
        d = float((la.mean() - lb.mean()) / pooled)
        extra = ""
        if c == config.target:
            ins = bad[m]; extra = f" poison-up {float(ins[up].float().mean()):.2f} loss poison {float(loss[m][ins].mean()):.2f} clean {float(loss[m][~ins].mean()):.2f}"
        out.append(f"{c}: loss up {float(la.mean()):.2f} down {float(lb.mean()):.2f} d {d:+.2f}{extra}")
    print(f"epoch {epoch} {point}"); print("\n".join(out))
