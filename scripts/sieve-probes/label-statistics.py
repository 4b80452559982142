"""Offline probe behind docs/SIEVE.md: per-label statistics of a stored run's training features
at one stage, from its epoch checkpoints (`eigenguard analyze RUN --save-every 1` keeps them).

For each label: the top-to-second energy ratio (r), the two-means cut along its top direction
(bimodality, gap in within-side sd, kurtosis, minority share), the share of rows nearer another
label's mean (foreign), each side's effective rank (er), the label's (all, and on a 256-dim random
projection: prj), and the spread statistic (ENT: the effective number of other labels nearest
each side's rows once the side's mean is taken away); for the target label, the cut's accuracy
and the row rule's TPR / FPR with either side taken as the clean one. The harness's ground truth
(which rows are poisoned) only scores.

    PYTHONPATH=src .venv/bin/python scripts/sieve-probes/label-statistics.py 201451d5 layer2 1 2000
"""
import math
import torch
from eigenguard.analysis.capture import capture_features
from eigenguard.analysis.signatures import top_direction, two_means_split

from probe_data import load_from_arguments

data = load_from_arguments()
config, splits = data.config, data.splits
point, images, labels, bad = data.stage, data.images, data.labels, data.bad
print(config.attack, config.defense, "poison label rows", int((labels==config.target).sum()), "poisoned", int(bad.sum()))
for epoch, model in data.models():
    points = {point: (getattr(model, point), "out")}
    f = capture_features(model, images, splits.train, points=points)[point].double()
    C = 10
    means = torch.stack([f[labels == c].mean(0) for c in range(C)])
    out = []
    for c in range(C):
        rows = f[labels == c]
        coord, ratio = top_direction(rows)
        up = two_means_split(coord)
        a, b = coord[up], coord[~up]
        within = (((a - a.mean())**2).sum() + ((b - b.mean())**2).sum()) / len(coord)
        between = coord.var(unbiased=False) - within
        bimod = float(between / within)
        frac = min(float(up.float().mean()), 1 - float(up.float().mean()))
        # kurtosis along top direction
        z = (coord - coord.mean()) / coord.std()
        kurt = float((z**4).mean())
        # nearest-other-label assignment of each side's residual-free rows: fraction of rows nearer
        # another label's mean than own label mean
        others = torch.cdist(rows, means); own = others[:, c].clone(); others[:, c] = math.inf
        foreign = float((others.min(1).values < own).float().mean())
        # the separating gap in within-sd units
        gap = float((a.mean() - b.mean()).abs() / within.sqrt())
        from eigenguard.analysis.spectrum import effective_rank
        ea, eb = (a.numel() and ((rows[up]-rows[up].mean(0))**2).sum(1).mean()), ((rows[~up]-rows[~up].mean(0))**2).sum(1).mean()
        era, erb = effective_rank(rows[up].float()-rows[up].float().mean(0)), effective_rank(rows[~up].float()-rows[~up].float().mean(0))
        eratio = float(max(ea, eb) / min(ea, eb)); rr = max(era, erb) / min(era, erb)
        _, _, vt = torch.linalg.svd(rows - rows.mean(0), full_matrices=False); v = vt[0]
        ov = [float(((f[labels == o] - f[labels == o].mean(0)) @ v).var()) for o in range(C) if o != c]
        nov = float(((rows - rows.mean(0)) @ v).var()) / (sum(ov) / len(ov))
        erall = effective_rank(rows.float() - rows.float().mean(0))
        ents = []
        for sidemask in (up, ~up):
            sub = rows[sidemask] - rows[sidemask].mean(0) + f.mean(0)
            dd = torch.cdist(sub, means); dd[:, c] = math.inf
            p = torch.bincount(dd.argmin(1), minlength=C).double() / len(sub)
            ents.append(float(math.exp(-(p[p > 0] * p[p > 0].log()).sum())))
        acc = f" er {era:.0f}/{erb:.0f} all {erall:.0f} ENT {ents[0]:.1f}/{ents[1]:.1f}"
        P = torch.randn(f.shape[1], 256, generator=torch.Generator().manual_seed(1), dtype=torch.float64) / 16
        pr = (rows - rows.mean(0)) @ P
        acc += f" prj {effective_rank(pr.float()):.0f}"
        if c == config.target:
            ins = bad[labels == c]
            agree = float((up == ins).double().mean()); acc += f" split {max(agree,1-agree):.3f}"
            acc += f" poison-up {float(ins[up].float().mean()):.2f} poison-down {float(ins[~up].float().mean()):.2f}"
            for cs in (up, ~up):
                cm = rows[cs].mean(0)
                to_own = ((rows - cm) ** 2).sum(1)
                dd = torch.cdist(rows, means) ** 2; dd[:, c] = math.inf
                fl = dd.min(1).values < to_own
                acc += f" | clean={'up' if cs is up else 'down'}: TPR {float(fl[ins].float().mean()):.2f} FPR {float(fl[~ins].float().mean()):.2f}"
        out.append(f"{c}: r {ratio:.1f} bim {bimod:.2f} gap {gap:.2f} kurt {kurt:.2f} min {frac:.2f} foreign {foreign:.2f}{acc}")
    print(f"epoch {epoch} {point}"); print("\n".join(out))
