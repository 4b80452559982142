"""``eigenguard analyze`` end to end on a stored run of the synthetic set: the capture points of a
guarded model, the numbers recorded in the store (and so in an export), the figures and tables
written, and clear errors for a run it cannot analyse."""
import json

import pytest
import torch

from eigenguard.analysis.analyze import analyze_run, markdown_table
from eigenguard.analysis.capture import capture_features, capture_points
from eigenguard.cli import main
from eigenguard.experiment import RunConfig, run
from eigenguard.store import ResultStore
from eigenguard.train import TrainConfig
from eigenguard.transfer import export_runs, import_runs


def guarded_config(**changes) -> RunConfig:
    return RunConfig(model="small_cnn", width=4, test_size=200,
                     train=TrainConfig(epochs=1, batch_size=32, lr=0.05, augment=False),
                     defense="eigenguard", defense_settings={"k": 4, "after": "block1"},
                     **changes)


@pytest.fixture(scope="module")
def stored(synthetic_root, tmp_path_factory):
    store = ResultStore(tmp_path_factory.mktemp("analysis") / "r.sqlite")
    result = run(guarded_config(), store, data_root=synthetic_root, progress=False,
                 log=lambda *a: None)
    return store, store.get_run(result.key)


@pytest.fixture(scope="module")
def analysed(stored, synthetic_root, tmp_path_factory):
    store, stored_run = stored
    out = tmp_path_factory.mktemp("figures")
    return analyze_run(store, stored_run, out_dir=out, count=60, data_root=synthetic_root,
                       log=lambda *a: None), out


def test_capture_points_of_a_guarded_model_and_their_shapes(stored, synthetic_root):
    store, stored_run = stored
    from eigenguard.experiment import load_run_model
    from eigenguard.data import load_dataset

    data = load_dataset("fashion-mnist", "train", root=synthetic_root)
    model = load_run_model(store, stored_run, data)
    points = capture_points(model)
    assert list(points)[:3] == ["block1", "block2", "block3"]
    assert {"block1_eigenguard.in", "block1_eigenguard.out"} <= set(points)
    features = capture_features(model, data.images[:10], data, batch_size=4)
    assert features["block1_eigenguard.in"].shape == features["block1_eigenguard.out"].shape
    assert features["block1_eigenguard.in"].shape[0] == 10
    # the stage after which the layer sits hands on the layer's output
    assert torch.equal(features["block1"], features["block1_eigenguard.out"])
    # the running filter passes the top k directions and damps the rest: its output's effective
    # rank is at most k, where its input's is far higher
    from eigenguard.analysis.spectrum import effective_rank
    assert effective_rank(features["block1_eigenguard.out"]) <= 4 + 1e-6
    assert effective_rank(features["block1_eigenguard.in"]) > 4


def test_analysis_numbers_are_recorded_and_written(analysed, stored):
    analysis, out = analysed
    store, stored_run = stored
    assert analysis.k == 4
    layer_input = analysis.points["block1_eigenguard.in"]
    for name in ("effective_rank.clean", "effective_rank.triggered", "effective_rank.mix",
                 "shift_in_top_k", "shift_in_running_top_k", "poisoned_enrichment_top_k"):
        assert name in layer_input
    for name in ("shift_in_top_k", "shift_in_running_top_k", "sample_shift_in_top_k"):
        assert 0.0 <= layer_input[name] <= 1.0 + 1e-9
    # the shift against the clean spread: the mean shift's energy is at most the per-image one
    assert 0.0 < layer_input["shift_to_spread"] <= layer_input["sample_shift_to_spread"]
    # the label-conditional signature: the poison's label (the target, 0) and its numbers
    assert layer_input["label_signature.poison_label_ratio"] >= 1.0
    assert layer_input["label_signature.poison_label_has_max_ratio"] in (0.0, 1.0)
    assert layer_input["label_signature.separation"] >= 0.0
    # after the running filter the shift lies in its k directions (the tail is damped 1000-fold)
    assert analysis.points["block1_eigenguard.out"]["shift_in_top_k"] > 0.999
    rows = {row["metric"]: row["value"] for row in store.metrics(stored_run.key)
            if row["protocol"] == "analysis"}
    assert rows["k"] == 4
    assert rows["block1_eigenguard.in.shift_in_running_top_k"] == pytest.approx(
        layer_input["shift_in_running_top_k"])
    assert store.get_run(stored_run.key).status == "finished"  # the run itself is untouched
    folder = out / stored_run.key[:8]
    numbers = json.loads((folder / "analysis.json").read_text())
    assert numbers["k"] == 4 and "block1_eigenguard.in" in numbers["points"]
    for name in numbers["figures"]:
        assert (folder / name).stat().st_size > 10_000
    assert any(name.startswith("tsne-block1_eigenguard.in") for name in numbers["figures"])
    table = markdown_table([analysis])
    assert table.count("\n") == 1 + len(analysis.points)


def test_analysis_rows_travel_with_an_export_and_stay_out_of_evaluations(analysed, stored,
                                                                         tmp_path):
    store, stored_run = stored
    export_runs(store, tmp_path / "runs.jsonl", [stored_run])
    other = ResultStore(tmp_path / "other.sqlite")
    import_runs(other, [tmp_path / "runs.jsonl"])
    assert any(row["protocol"] == "analysis" for row in other.metrics(stored_run.key))
    from eigenguard.store import gather_evaluations
    assert all(entry["protocol"] != "analysis"
               for entry in gather_evaluations(other.metrics(), split="train"))


def test_cli_analyze_and_its_errors(stored, analysed, synthetic_root, tmp_path, capsys):
    store, stored_run = stored
    code = main(["analyze", stored_run.key[:8], "--store", str(store.path), "--out",
                 str(tmp_path), "--samples", "30", "--no-tsne", "--data-root",
                 str(synthetic_root), "--quiet"])
    assert code == 0
    assert "block1_eigenguard.in" in capsys.readouterr().out
    assert not list((tmp_path / stored_run.key[:8]).glob("tsne-*"))
    assert main(["analyze", "zzzz", "--store", str(store.path)]) == 2
    assert "matches 0 trained runs" in capsys.readouterr().err
    # a run imported from JSON Lines has no checkpoint here: it is trained again first (the
    # same key and, training being deterministic, the same test metrics)
    export_runs(store, tmp_path / "runs.jsonl", [stored_run])
    bare = ResultStore(tmp_path / "bare.sqlite")
    import_runs(bare, [tmp_path / "runs.jsonl"])
    assert main(["analyze", stored_run.key[:8], "--store", str(bare.path), "--data-root",
                 str(synthetic_root), "--out", str(tmp_path / "again"), "--samples", "30",
                 "--no-tsne"]) == 0
    assert "training it again for its weights" in capsys.readouterr().out
    retrained = bare.get_run(stored_run.key)
    assert bare.resolve(retrained.checkpoint).is_file()

    def test_scores(held):
        return {(m["protocol"], m["metric"]): m["value"] for m in held.metrics(stored_run.key)
                if m["split"] == "test" and m["metric"] in ("acc", "asr")}

    assert test_scores(bare) and test_scores(bare) == pytest.approx(test_scores(store),
                                                                      abs=1e-6)


def test_other_data_files_are_refused_with_the_fix(stored, tmp_path):
    """The analysis and the re-evaluation read the run's data through one check: files whose
    content differs from those the run was trained on are named, with --data-root as the fix."""
    from conftest import write_synthetic_idx_dataset
    from eigenguard.experiment import reevaluate

    store, stored_run = stored
    other = write_synthetic_idx_dataset(tmp_path / "other", seed=5)
    with pytest.raises(ValueError, match="not the data run .* --data-root"):
        analyze_run(store, stored_run, out_dir=tmp_path, count=30, data_root=other,
                    tsne=False, log=lambda *a: None)
    with pytest.raises(ValueError, match="not the data run .* --data-root"):
        reevaluate(store, stored_run, data_root=other, progress=False, log=lambda *a: None)
