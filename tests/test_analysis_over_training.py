"""``--save-every``: intermediate checkpoints that leave training bitwise unchanged and the run's
key alone, a stored run trained again (same metrics) only when it lacks them, their files removed
with the run, and ``eigenguard analyze`` over training (effective rank and ASR per epoch).

The planted setting: the synthetic stripes of conftest, 20% BadNets, a small CNN of width 4,
three epochs in batches of 16 at lr 0.1, one thread. Measured: ASR on the 200 test images 23%,
67% and 100% after epochs 1, 2 and 3 (ACC 66%, 100%, 100%); each run trains in about 1.5 s.
"""
import importlib
import json

import pytest
import torch

import eigenguard
from conftest import stripes
from eigenguard.analysis.analyze import analyze_run
from eigenguard.analysis.over_training import ensure_epoch_checkpoints
from eigenguard.attacks.helpers import single_thread
from eigenguard.cli import main
from eigenguard.experiment import RunConfig, missing_epoch_checkpoints, run
from eigenguard.splits import load_data
from eigenguard.store import ResultStore
from eigenguard.train import KeepStates, TrainConfig, train
from eigenguard.transfer import export_runs, import_runs

pytestmark = pytest.mark.usefixtures("one_thread")
importlib.import_module("extension_examples")  # registers example-detector, example-finetune

QUIET = dict(progress=False, log=lambda *a: None)


def config(**changes) -> RunConfig:
    settings = dict(model="small_cnn", width=4, test_size=200, poison_ratio=0.2,
                    train=TrainConfig(epochs=3, batch_size=16, lr=0.1, augment=False))
    return RunConfig(**{**settings, **changes})


def outcome(store, key) -> dict:
    """The run's evaluation metrics (the cost rows, wall-clock seconds, left out)."""
    return {(row["split"], row["protocol"], row["metric"]): row["value"]
            for row in store.metrics(key) if row["protocol"] not in ("cost", "analysis")}


def epoch_files(store, key) -> dict:
    return {path.name: path.stat().st_mtime_ns for path in store.epoch_checkpoint_files(key)}


@pytest.fixture(scope="module")
def stored(synthetic_root, tmp_path_factory):
    """A run stored without intermediate checkpoints, then asked for them every epoch."""
    store = ResultStore(tmp_path_factory.mktemp("over-training") / "r.sqlite")
    with single_thread():
        plain = run(config(), store, data_root=synthetic_root, **QUIET)
        before = dict(run=store.get_run(plain.key), metrics=outcome(store, plain.key))
        lines = []
        kept = run(config(), store, data_root=synthetic_root, progress=False, log=lines.append,
                   save_every=1)
    return store, kept, before, lines


def test_keeping_states_leaves_training_bitwise_identical():
    """A guarded model (its running statistics are buffers too) trained with and without the
    hook ends bitwise equal, with the same history; the kept epochs are numbered across calls."""
    data = stripes(256, 0)
    finals, keeper = [], KeepStates(2)
    for hooks in ((), (keeper,)):
        torch.manual_seed(0)
        model = eigenguard.create_model("small_cnn", in_channels=1, num_classes=10, width=4)
        eigenguard.guard(model, after="block1", k=4)
        history = train(model, data, TrainConfig(epochs=3, batch_size=32), seed=0,
                        progress=False, hooks=hooks)
        finals.append((model.state_dict(), [(h["loss"], h["train_acc"]) for h in history]))
    (plain, plain_history), (hooked, hooked_history) = finals
    assert plain_history == hooked_history
    assert plain.keys() == hooked.keys()
    assert all(torch.equal(plain[name], hooked[name]) for name in plain)
    assert sorted(keeper.states) == [2, 3]  # every 2 epochs, and the last one
    assert all(torch.equal(keeper.states[3][name], plain[name]) for name in plain)
    assert not torch.equal(keeper.states[2]["classifier.weight"], plain["classifier.weight"])
    # a second call on the same hook continues the numbering: epochs 4 and 5
    train(model, data, TrainConfig(epochs=2, batch_size=32), seed=1, progress=False,
          hooks=[keeper])
    assert sorted(keeper.states) == [2, 3, 4, 5]
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match="save_every"):
            KeepStates(bad)


def test_a_run_keeps_its_epochs_under_the_same_key_and_metrics(stored, synthetic_root):
    store, kept, before, lines = stored
    fingerprint = load_data("fashion-mnist", synthetic_root).fingerprint
    assert kept.key == before["run"].key == config().key(fingerprint)
    assert not kept.cached  # it lacked them: trained again, and said why
    assert any("training it again" in line and "kept no intermediate" in line for line in lines)
    assert outcome(store, kept.key) == before["metrics"]  # deterministic: the same ACC and ASR
    row = store.get_run(kept.key)
    listed = row.extra["epoch_checkpoints"]
    assert listed["every"] == 1 and listed["epochs"] == [1, 2, 3]
    assert listed["files"] == [f"checkpoints/{kept.key}.epoch{e}.safetensors" for e in (1, 2, 3)]
    assert all(store.resolve(path).is_file() for path in listed["files"])
    final = store.read_tensors(row.checkpoint, "checkpoint", row.key)
    last = store.read_tensors(listed["files"][-1], "epoch checkpoint", row.key)
    assert all(torch.equal(final[name], last[name]) for name in final)
    assert missing_epoch_checkpoints(store, row, 1) is None
    assert "every 1 epochs" in missing_epoch_checkpoints(store, row, 2)


def test_asking_again_with_the_same_interval_does_not_train(stored, synthetic_root):
    store, kept, _, _ = stored
    row, files = store.get_run(kept.key), epoch_files(store, kept.key)
    for save_every in (1, None):  # without the flag: the stored run, as always
        again = run(config(), store, data_root=synthetic_root, save_every=save_every, **QUIET)
        assert again.cached and again.key == kept.key
    assert store.get_run(kept.key).finished == row.finished
    assert epoch_files(store, kept.key) == files


def test_another_interval_trains_again_and_replaces_the_files(synthetic_root, tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    first = run(config(), store, data_root=synthetic_root, save_every=1, **QUIET)
    metrics = outcome(store, first.key)
    second = run(config(), store, data_root=synthetic_root, save_every=2, **QUIET)
    assert not second.cached and second.key == first.key
    assert second.extra["epoch_checkpoints"]["epochs"] == [2, 3]  # every 2, and the last
    assert sorted(epoch_files(store, first.key)) == [f"{first.key}.epoch{e}.safetensors"
                                                     for e in (2, 3)]
    assert outcome(store, first.key) == metrics
    store.delete_run(first.key)  # the run goes with every file of it
    assert epoch_files(store, first.key) == {}
    assert list(store.checkpoint_dir.iterdir()) == []


def test_over_training_analysis_rows_figures_and_table(stored, synthetic_root, tmp_path):
    store, kept, _, _ = stored
    analysis = analyze_run(store, store.get_run(kept.key), out_dir=tmp_path, count=40,
                           data_root=synthetic_root, tsne=False, save_every=1,
                           log=lambda *a: None)
    over = analysis.over_training
    assert over.epochs == [1, 2, 3] and over.test_images == 200
    assert over.points == ["block1", "block2", "block3"]
    assert set(over.protocol.values()) == {"triggered"}
    # measured 23%, 67%, 100%: the backdoor is learnt over the epochs
    assert over.asr[1] < 0.5 and over.asr[3] > 0.9 and over.asr[3] > over.asr[1] + 0.3
    # the last epoch is the final model, on the same (whole) test split
    assert over.asr[3] == pytest.approx(outcome(store, kept.key)[("test", "triggered", "asr")])
    rows = {row["metric"]: row["value"] for row in store.metrics(kept.key)
            if row["protocol"] == "analysis"}
    for epoch in (1, 2, 3):
        assert rows[f"epoch{epoch}.asr"] == pytest.approx(over.asr[epoch])
        for point in over.points:
            for kind in ("clean", "triggered", "mix"):
                value = rows[f"epoch{epoch}.{point}.effective_rank.{kind}"]
                assert 1.0 <= value <= 40  # at most the 40 images' rank
            for name in ("poison_label_ratio", "max_other_ratio", "separation", "split_accuracy"):
                value = rows[f"epoch{epoch}.{point}.label_signature.{name}"]
                assert value == pytest.approx(over.signatures[epoch][point][name])
            assert rows[f"epoch{epoch}.{point}.label_signature.poison_label_ratio"] >= 1.0
            assert rows[f"epoch{epoch}.{point}.label_signature.separation"] >= 0.0
            assert 0.5 <= rows[f"epoch{epoch}.{point}.label_signature.split_accuracy"] <= 1.0
    # measured 0.25 sd at block1 and 18.3 at block3 once learnt: the poison separates in depth
    last = over.signatures[3]
    assert last["block3"]["separation"] > 5 and last["block1"]["separation"] < 2
    assert store.get_run(kept.key).status == "finished"  # nothing retrained for the analysis
    folder = tmp_path / kept.key[:8]
    for kind in ("clean", "triggered", "mix"):
        assert (folder / f"over-training-{kind}.png").stat().st_size > 10_000
    numbers = json.loads((folder / "analysis.json").read_text())
    assert numbers["over_training"]["epochs"] == [1, 2, 3]
    table = (folder / "analysis.md").read_text()
    assert "| epoch | protocol | ASR % |" in table and "| 3 | triggered | " in table
    assert "Label-conditional signatures of the mixed images over training" in table
    assert "| epoch | ASR % | block1 | block2 | block3 |" in table


def test_cli_analyze_save_every_trains_a_run_without_them(synthetic_root, tmp_path, capsys):
    store = ResultStore(tmp_path / "r.sqlite")
    guarded = config(defense="eigenguard", defense_settings={"k": 4, "after": "block1"})
    plain = run(guarded, store, data_root=synthetic_root, **QUIET)
    metrics = outcome(store, plain.key)
    code = main(["analyze", plain.key[:8], "--store", str(store.path), "--out",
                 str(tmp_path / "out"), "--samples", "30", "--no-tsne", "--save-every", "2",
                 "--data-root", str(synthetic_root)])
    assert code == 0
    out = capsys.readouterr().out
    assert "training it again to keep its weights every 2 epochs" in out
    assert "| 2 | running | " in out and "| 3 | running | " in out  # the guard's batch-free mode
    assert "block1_eigenguard.in eff. rank" in out
    assert store.get_run(plain.key).extra["epoch_checkpoints"]["epochs"] == [2, 3]
    assert outcome(store, plain.key) == metrics


def test_followed_training_calls_and_runs_with_nothing_to_follow(synthetic_root, tmp_path):
    """Only calls on the poisoned set are followed: the example detector's one-epoch probe, not
    its retraining on the samples it keeps; a post-training defense keeps no epoch and is
    refused, naming its undefended run."""
    store = ResultStore(tmp_path / "r.sqlite")
    detector = run(config(defense="example-detector"), store, data_root=synthetic_root,
                   save_every=1, **QUIET)
    assert len(detector.history) == 1 + 3
    assert detector.extra["epoch_checkpoints"]["epochs"] == [1]
    repaired = run(config(defense="example-finetune"), store, data_root=synthetic_root,
                   save_every=1, **QUIET)
    assert repaired.extra["epoch_checkpoints"]["epochs"] == []
    undefended = run(config(), store, data_root=synthetic_root, **QUIET)
    refused = f"trains nothing on the poisoned set.*{undefended.key[:8]}"
    with pytest.raises(ValueError, match=refused):
        ensure_epoch_checkpoints(store, store.get_run(repaired.key), 1,
                                 data_root=synthetic_root, log=lambda *a: None)
    with pytest.raises(ValueError, match="save_every"):  # before any data loads
        run(config(), store, data_root=tmp_path / "nowhere", save_every=0, **QUIET)


def test_an_export_carries_no_epoch_files(stored, tmp_path):
    store, kept, _, _ = stored
    export_runs(store, tmp_path / "runs.jsonl", [store.get_run(kept.key)])
    other = ResultStore(tmp_path / "other.sqlite")
    import_runs(other, [tmp_path / "runs.jsonl"])
    assert other.epoch_checkpoint_files(kept.key) == []
    reason = missing_epoch_checkpoints(other, other.get_run(kept.key), 1)
    assert reason == "its intermediate checkpoint files are not in this store"
