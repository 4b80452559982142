"""EigenGuard layer speed, measured side by side in one run (the machines are noisy).

Prints ratios, not absolute claims:
  1. the fast path (B × B Gram matrix) against the reference path (SVD of the B × d features),
     forward + backward, B = 128, d = 12,544 and 65,536;
  2. a PreAct-ResNet18 training step with and without EigenGuard (and without running statistics);
  3. the memory the running statistics hold, the time of each piece of the layer's work, peak
     GPU memory where a GPU is used, and peak process memory (RSS) of a few CPU training steps,
     each variant in a fresh process.

    python benchmarks/layer.py [--device cuda] [--repeats 7] [--steps 4] [--width 16] [--size 28] [--after layer1]

Timings interleave the variants and report medians.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from eigenguard import create_model, guard
from eigenguard.defenses.eigenguard import EigenGuardDefense
from eigenguard.layer import (exact_gram, filter_weights, find_guards, spectral_filter,
                              update_running_subspace)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def overhead_percent(reference_seconds: float, seconds: float) -> float:
    """How much longer ``seconds`` took than ``reference_seconds``, in % (negative: faster)."""
    if not reference_seconds > 0:
        raise ValueError(f"the reference time must be positive, got {reference_seconds!r}")
    return 100 * (seconds / reference_seconds - 1)


def share_percent(part_seconds: float, whole_seconds: float) -> float:
    """``part_seconds`` as a percentage of ``whole_seconds`` (a piece of a training step)."""
    if not whole_seconds > 0:
        raise ValueError(f"the whole time must be positive, got {whole_seconds!r}")
    return 100 * part_seconds / whole_seconds


def speedup(reference_seconds: float, seconds: float) -> float:
    """How many times faster ``seconds`` is than ``reference_seconds``."""
    if not seconds > 0:
        raise ValueError(f"the time must be positive, got {seconds!r}")
    return reference_seconds / seconds


def interleaved_medians(variants: dict, repeats: int, device) -> dict:
    """Run every variant once per round, ``repeats`` rounds after one warm-up round."""
    times = {name: [] for name in variants}
    for round_ in range(repeats + 1):
        for name, fn in variants.items():
            elapsed = timed(fn, device)
            if round_:
                times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


def filter_paths(device, repeats: int) -> None:
    print("1. spectral filter, forward + backward, B = 128, k = 32 (float32 features)")
    for d in (12_544, 65_536):
        x = torch.randn(128, d, device=device, requires_grad=True)
        upstream = torch.randn(128, d, device=device)

        def step(method):
            return lambda: spectral_filter(x, 32, method=method).backward(upstream)

        medians = interleaved_medians({"gram": step("gram"), "svd": step("svd")}, repeats, device)
        ratio = speedup(medians["svd"], medians["gram"])
        print(f"   d = {d:>6}: fast {1e3 * medians['gram']:8.1f} ms, reference "
              f"{1e3 * medians['svd']:8.1f} ms, speed-up x{ratio:.1f}")


def training_step(args, device) -> None:
    print(f"2. training step, preact_resnet18 width {args.width}, B = 128, "
          f"{args.size}x{args.size}x{args.channels}, EigenGuard k = 32 after {args.after}")
    models = {}
    for name, settings in VARIANTS.items():
        torch.manual_seed(0)
        model = create_model("preact_resnet18", in_channels=args.channels, num_classes=10,
                             width=args.width)
        if settings is not None:
            guard(model, after=args.after, k=32, **settings)
        model.to(device).train()
        models[name] = (model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    x = torch.randn(128, args.channels, args.size, args.size, device=device)
    y = torch.randint(0, 10, (128,), device=device)

    def step(model, optimizer, steps=1):
        def run():
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
        return run

    # several steps per timing, so work done every few steps (the running statistics) is averaged
    medians = interleaved_medians({n: step(*mo, args.steps) for n, mo in models.items()},
                                  args.repeats, device)
    base = medians["plain"]
    print(f"   median of {args.repeats} rounds of {args.steps} steps, variants interleaved")
    for name, value in medians.items():
        print(f"   {name:<30} {1e3 * value / args.steps:8.1f} ms/step  "
              f"overhead {overhead_percent(base, value):+6.1f}%")
    layer = find_guards(models["eigenguard"][0])[0][1]
    held = layer.running_basis.numel() * layer.running_basis.element_size()
    print(f"3. running statistics: basis {tuple(layer.running_basis.shape)} = {held / 2**20:.2f} MiB "
          f"(d x r, r = 2k; a d x d matrix would be "
          f"{layer.running_basis.shape[0] ** 2 * 4 / 2**20:.0f} MiB)")
    layer_pieces(layer.running_basis.shape[0], device, args.repeats, base / args.steps)
    if device.type == "cuda":
        for name, (model, optimizer) in models.items():
            torch.cuda.reset_peak_memory_stats(device)
            step(model, optimizer)()
            sync(device)
            print(f"   peak GPU memory, {name:<30} "
                  f"{torch.cuda.max_memory_allocated(device) / 2**20:8.1f} MiB")


def layer_pieces(d: int, device, repeats: int, step_seconds: float) -> None:
    """Time each piece of the layer's work on a batch of 128 features of the inserted size d."""
    x = torch.randn(128, d, device=device)
    gram = exact_gram(x)
    weights = filter_weights(gram, 32).float()
    basis, power = update_running_subspace(torch.zeros(0, device=device),
                                           torch.zeros(0, device=device), x, 0.1, 64)
    pieces = {
        "Gram matrix F F^T (float64)": lambda: exact_gram(x),
        "filter matrix P (eigh, 128 x 128)": lambda: filter_weights(gram, 32),
        "P F (forward; backward once more)": lambda: weights @ x,
        "running update (one fold)": lambda: update_running_subspace(basis, power, x, 0.1, 64,
                                                                     gram),
    }
    if device.type == "cuda":  # eigh synchronizes with the CPU anyway: is LAPACK's faster?
        pieces["filter matrix P, eigh on the CPU"] = \
            lambda: filter_weights(gram.cpu(), 32).to(device, non_blocking=True)
    medians = interleaved_medians(pieces, repeats, device)
    print(f"   the layer's pieces at d = {d}, B = 128, per call (share of a plain training step):")
    for name, value in medians.items():
        print(f"   {name:<36} {1e3 * value:8.2f} ms  ({share_percent(value, step_seconds):4.1f}%)")


VARIANTS = {"plain": None, "eigenguard": {},
            "eigenguard, stats every batch": {"stats_every": 1},
            "eigenguard, no running stats": {"track_running_stats": False, "eval_mode": "batch"}}


def memory_child(args, variant: str) -> None:
    """Print the peak RSS (KiB) of training steps 2 and 3 of one variant (Linux only)."""
    settings = VARIANTS[variant]
    model = create_model("preact_resnet18", in_channels=args.channels, num_classes=10,
                         width=args.width)
    if settings is not None:
        guard(model, after=args.after, k=32, **settings)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(128, args.channels, args.size, args.size)
    y = torch.randint(0, 10, (128,))
    for step in range(3):
        if step == 1:  # after a warm-up step: reset the high-water mark (Linux)
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    with open("/proc/self/status") as handle:
        print(next(line.split()[1] for line in handle if line.startswith("VmHWM")))


def peak_cpu_memory(args) -> None:
    if not args.memory_repeats:
        return
    print("4. peak process memory (RSS) of CPU training steps after a warm-up step, each variant "
          "in a fresh process")
    samples = {variant: [] for variant in VARIANTS}
    for _ in range(args.memory_repeats):  # interleaved; the allocator makes single runs noisy
        for variant in VARIANTS:
            command = [sys.executable, __file__, "--memory-child", variant, "--width",
                       str(args.width), "--size", str(args.size), "--channels", str(args.channels),
                       "--after", args.after]
            samples[variant].append(int(subprocess.run(command, capture_output=True, text=True,
                                                       check=True).stdout.split()[-1]))
    peaks = {variant: statistics.median(values) for variant, values in samples.items()}
    print(f"   median of {args.memory_repeats} processes per variant")
    for variant, peak in peaks.items():
        print(f"   {variant:<30} {peak / 1024:8.1f} MiB  "
              f"({(peak - peaks['plain']) / 1024:+7.1f} MiB vs plain)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=4,
                        help="training steps per timed round (default 4)")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--after", default=EigenGuardDefense.after,
                        help="module the layer follows (default: the defense's default)")
    parser.add_argument("--skip-filter", action="store_true")
    parser.add_argument("--memory-repeats", type=int, default=5)
    parser.add_argument("--memory-child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args, args.memory_child)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if not args.skip_filter:
        filter_paths(device, args.repeats)
    training_step(args, device)
    if device.type == "cpu" and sys.platform == "linux":
        peak_cpu_memory(args)


if __name__ == "__main__":
    main()
