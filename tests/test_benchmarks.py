"""The benchmark scripts run (at toy sizes: their figures are measured by hand, not in tests)."""
import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_layer_benchmark_prints_every_variant_and_the_memory_held():
    command = [sys.executable, str(BENCHMARKS / "layer.py"), "--skip-filter", "--width", "2",
               "--size", "8", "--repeats", "1", "--steps", "2", "--memory-repeats", "1"]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=300).stdout
    overheads = re.findall(r"^\s+(.+?)\s+[\d.]+ ms/step\s+overhead\s+([+-][\d.]+)%", out, re.M)
    assert [name for name, _ in overheads] == ["plain", "eigenguard",
                                               "eigenguard, stats every batch",
                                               "eigenguard, no running stats"]
    assert float(overheads[0][1]) == 0.0
    assert "basis (128, 64) = 0.03 MiB" in out  # d = 2 channels * 8 * 8 after layer1, r = 2k
    pieces = re.findall(r"^\s+(.+?)\s+[\d.]+ ms\s+\(\s*[\d.]+%\)", out, re.M)
    assert pieces == ["Gram matrix F F^T (float64)", "filter matrix P (eigh, 128 x 128)",
                      "P F (forward; backward once more)", "running update (one fold)"]
    assert len(re.findall(r"MiB vs plain", out)) == 4
