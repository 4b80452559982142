"""Offline probe behind docs/SIEVE.md: per label, the mean training loss on each side of the
two-means cut along the label's top direction at one stage, and their difference in pooled
standard deviations, per epoch checkpoint of a stored run.

    PYTHONPATH=src .venv/bin/python scripts/sieve-probes/side-loss-gap.py 201451d5 layer2 1 3000
"""
import math
import torch
import torch.nn.functional as F
from eigenguard.analysis.signatures import top_direction, two_means_split
from eigenguard.train import model_input

from probe_data import load_from_arguments

data = load_from_arguments()
config, splits = data.config, data.splits
point, images, labels, bad = data.stage, data.images, data.labels, data.bad
for epoch, model in data.models():
    feats, logits = [], []
    h = getattr(model, point).register_forward_hook(lambda m, a, o: feats.append(o.flatten(1).double()))
    with torch.no_grad():
        for s in range(0, len(images), 256):
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
