"""The benchmark scripts: their arithmetic on known numbers, and a run at toy sizes.

Their figures are measured by hand; no test asserts a timing.
"""
import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


layer_benchmark = load_script("layer")


def test_overhead_is_the_extra_time_in_percent_of_the_reference():
    overhead = layer_benchmark.overhead_percent
    assert overhead(2.0, 2.5) == pytest.approx(25.0)
    assert overhead(2.0, 1.5) == pytest.approx(-25.0)
    assert overhead(0.004, 0.012) == pytest.approx(200.0)
    assert overhead(3.0, 3.0) == 0.0
    with pytest.raises(ValueError, match="reference time must be positive"):
        overhead(0.0, 1.0)


def test_share_and_speedup():
    assert layer_benchmark.share_percent(0.5, 4.0) == pytest.approx(12.5)
    assert layer_benchmark.share_percent(0.006, 0.002) == pytest.approx(300.0)
    assert layer_benchmark.speedup(9.0, 1.5) == pytest.approx(6.0)
    assert layer_benchmark.speedup(1.0, 4.0) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="positive"):
        layer_benchmark.share_percent(1.0, 0.0)
    with pytest.raises(ValueError, match="positive"):
        layer_benchmark.speedup(1.0, 0.0)


def finite(text):
    value = float(text)
    assert math.isfinite(value), text
    return value


def test_layer_benchmark_prints_every_variant_and_the_memory_held():
    command = [sys.executable, str(BENCHMARKS / "layer.py"), "--skip-filter", "--width", "2",
               "--size", "8", "--repeats", "1", "--steps", "2", "--memory-repeats", "1"]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=300).stdout
    rows = re.findall(r"^\s+(.+?)\s+(\S+) ms/step\s+overhead\s+(\S+)%", out, re.M)
    assert [name for name, _, _ in rows] == ["plain", "eigenguard",
                                             "eigenguard, stats every batch",
                                             "eigenguard, no running stats"]
    ms = [finite(value) for _, value, _ in rows]
    overheads = [finite(value) for _, _, value in rows]
    assert all(value > 0 for value in ms)
    # each overhead is relative to the plain step: consistent with the printed times up to their
    # rounding (0.05 ms for the times, 0.05 points for the overhead)
    plain = ms[0]
    for value, overhead in zip(ms, overheads):
        low = 100 * ((value - 0.05) / (plain + 0.05) - 1) - 0.05
        high = 100 * ((value + 0.05) / (plain - 0.05) - 1) + 0.05
        assert low <= overhead <= high, (value, plain, overhead)
    assert "basis (128, 64) = 0.03 MiB" in out  # d = 2 channels * 8 * 8 after layer1, r = 2k
    pieces = re.findall(r"^\s+(.+?)\s+(\S+) ms\s+\(\s*(\S+)%\)", out, re.M)
    assert [name for name, _, _ in pieces] == [
        "Gram matrix F F^T (float64)", "filter matrix P (eigh, 128 x 128)",
        "P F (forward; backward once more)", "running update (one fold)"]
    assert all(finite(ms) >= 0 and finite(share) >= 0 for _, ms, share in pieces)
    memory = re.findall(r"^\s+(.+?)\s+(\S+) MiB\s+\(\s*(\S+) MiB vs plain\)", out, re.M)
    assert [name for name, _, _ in memory] == [name for name, _, _ in rows]
    assert all(finite(peak) > 0 and math.isfinite(float(more)) for _, peak, more in memory)
