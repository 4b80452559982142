"""The main job in miniature on the real Fashion-MNIST files (installed by `make test`)."""
import time
from pathlib import Path

import pytest

from eigenguard.cli import main
from eigenguard.store import ResultStore

FASHION = Path("/usr/share/datasets/fashion-mnist")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(),
                       reason="Fashion-MNIST not installed: sudo apt-get install dataset-fashion-mnist"),
]


def test_badnets_without_and_with_eigenguard_on_fashion_mnist(tmp_path, capsys):
    store = tmp_path / "results.sqlite"
    common = ["--store", str(store), "--train-size", "10000", "--test-size", "1000",
              "--epochs", "3", "--batch-size", "64", "--quiet"]
    assert main(["run", "--defense", "none", *common]) == 0
    assert main(["run", "--defense", "eigenguard", *common]) == 0
    runs = {r.config["defense"]: r for r in ResultStore(store).find_runs()}
    assert set(runs) == {"none", "eigenguard"}
    (undefended,) = ResultStore(store).evaluations(runs["none"].key)
    assert ResultStore(store).evaluations(runs["none"].key, split="validation")  # for tuning
    # calibration: on real data the default model learns the task and the backdoor
    assert undefended["acc"] > 0.75 and undefended["asr"] > 0.9
    guarded = ResultStore(store).evaluations(runs["eigenguard"].key)
    assert sorted(e["protocol"] for e in guarded) == ["mixed", "running", "single", "triggered"]
    assert all(0 <= e[m] <= 1 for e in guarded for m in ("acc", "asr", "ra"))
    capsys.readouterr()
    start = time.monotonic()
    assert main(["run", "--defense", "eigenguard", *common]) == 0  # stored: no retraining
    assert time.monotonic() - start < 10
    assert "already in" in capsys.readouterr().out
