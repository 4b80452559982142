"""Offline probe behind docs/SIEVE.md: each label's effective rank, from the covariance of a
random projection (128 and 512 dimensions) of a stored run's training features at one stage, per
epoch checkpoint.

    PYTHONPATH=src .venv/bin/python scripts/sieve-probes/label-effective-rank.py 201451d5 layer2 1,2 8000
"""
import math
import torch
from eigenguard.analysis.capture import capture_features

from probe_data import load_from_arguments

data = load_from_arguments()
config, splits = data.config, data.splits
point, images, labels, bad = data.stage, data.images, data.labels, data.bad
def erank(cov):
    e = torch.linalg.eigvalsh(cov).clamp(min=0); p = e / e.sum(); p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))
for epoch, model in data.models():
    f = capture_features(model, images, splits.train, points={point: (getattr(model, point), "out")})[point].double()
    for m in (128, 512):
        P = torch.randn(f.shape[1], m, generator=torch.Generator().manual_seed(1), dtype=torch.float64) / math.sqrt(m)
        res = []
        for c in range(10):
            r = f[labels == c] @ P; r = r - r.mean(0)
            res.append(erank(r.T @ r / len(r)))
        res = torch.tensor(res); o = res[1:]
        print(f"epoch {epoch} {point} m={m}: target {res[0]:.1f} others max {o.max():.1f} median {o.median():.1f} -> {res[0]/o.max():.2f}", [round(x) for x in res.tolist()])
