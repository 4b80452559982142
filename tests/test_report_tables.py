"""The source-layout tables from a synthetic store: numbers checked by hand, marks, protocols."""
import dataclasses

import pytest

from eigenguard.attacks import create_attack
from eigenguard.report_tables import (TUNING_NOTE, format_source_markdown, source_tables)
from eigenguard.settings import changed_settings
from eigenguard.store import ResultStore

EG = "eigenguard(k=32)"
EG8 = "eigenguard(k=8)"


def add_run(store, key, *, defense="none", seed=0, attack="badnets", ratio=0.1, k=32,
            evaluations=None, split="test", history=(), commit="abcdef0123456789",
            wall_seconds=1.0, attack_settings=None):
    """A finished run; ``evaluations``: {protocol: (acc, asr, ra)} as fractions."""
    config = {"dataset": "fashion-mnist", "model": "preact_resnet18", "width": 16,
              "attack": attack, "attack_settings": attack_settings or {}, "poison_ratio": ratio,
              "seed": seed,
              "target": 0, "train": {"epochs": 4}, "train_size": None, "defense": defense,
              "defense_settings": {} if defense == "none" else {"k": k}}
    token = store.claim(key, f"{attack}-{ratio}-{seed}", config, {}, commit, "cpu").token
    metrics = [dict(split=split, protocol=protocol, metric=name, value=value, eval_seed=0)
               for protocol, (acc, asr, ra) in (evaluations or {}).items()
               for name, value in (("acc", acc), ("asr", asr), ("ra", ra), ("batch_size", 128))]
    store.complete(key, token, status="finished", history=list(history), metrics=metrics,
                   wall_seconds=wall_seconds, checkpoint=None, attack_state=None)


def row(table, attack, metric):
    return next(r for r in table.rows if r.attack == attack and r.metric == metric)


def texts(table, attack, metric):
    r = row(table, attack, metric)
    return [table.cell_text(r, i) for i in range(len(table.columns))]


def bold(table, attack, metric):
    return [cell is not None and cell.bold for cell in row(table, attack, metric).cells]


@pytest.fixture
def store(tmp_path):
    return ResultStore(tmp_path / "s.sqlite")


def test_cells_are_mean_and_sample_std_over_seeds(store):
    for seed, acc, asr, ra in ((0, 0.80, 1.00, 0.00), (1, 0.82, 0.90, 0.05), (2, 0.84, 0.95, 0.10)):
        add_run(store, f"n{seed}", seed=seed, evaluations={"triggered": (acc, asr, ra)})
    [table] = source_tables(store, None)
    assert [c.header for c in table.columns] == ["No defense"]
    assert texts(table, "badnets", "ACC") == ["82.00 ± 2.00"]
    assert texts(table, "badnets", "ASR") == ["95.00 ± 5.00"]
    assert texts(table, "badnets", "RA") == ["5.00 ± 5.00"]
    assert texts(table, "badnets", "DER") == ["-"]  # the undefended column has no DER
    assert "n = 3 seeds per cell" in table.caption and "test split" in table.caption
    assert "poison 10%" in table.caption and "4 epochs" in table.caption
    assert "preact_resnet18/16" in table.caption and "fashion-mnist" in table.caption


def test_der_is_computed_per_seed_against_the_same_setup_then_averaged(store):
    add_run(store, "n0", seed=0, evaluations={"triggered": (0.90, 1.00, 0.0)})
    add_run(store, "n1", seed=1, evaluations={"triggered": (0.80, 0.90, 0.0)})
    # EigenGuard is read under "running"; its triggered numbers must not enter
    add_run(store, "e0", seed=0, defense="eigenguard",
            evaluations={"running": (0.85, 0.10, 0.7), "triggered": (0.5, 0.5, 0.0)})
    add_run(store, "e1", seed=1, defense="eigenguard",
            evaluations={"running": (0.82, 0.50, 0.4), "triggered": (0.5, 0.5, 0.0)})
    [table] = source_tables(store, None)
    # seed 0: (0.90 - 0.05 + 1) / 2 = 92.5; seed 1: (0.40 - 0 + 1) / 2 = 70.0 (ACC rose)
    # mean 81.25, sample std sqrt(2 * 11.25^2) = 15.91 (DER of the means would be 81.75)
    assert texts(table, "badnets", "DER") == ["-", "81.25 ± 15.91"]
    assert texts(table, "badnets", "ACC") == ["85.00 ± 7.07", "83.50 ± 2.12"]
    # selecting only the defended runs still finds the references in the store
    [alone] = source_tables(store, [r for r in store.find_runs() if r.key.startswith("e")])
    assert texts(alone, "badnets", "DER") == ["81.25 ± 15.91"]


def test_the_best_defense_of_each_row_is_bold(store):
    add_run(store, "n", evaluations={"triggered": (0.90, 0.01, 0.10)})
    add_run(store, "a", defense="eigenguard", k=32, evaluations={"running": (0.88, 0.05, 0.70)})
    add_run(store, "b", defense="eigenguard", k=8, evaluations={"running": (0.86, 0.20, 0.80)})
    [table] = source_tables(store, None)
    assert [c.name for c in table.columns] == ["No defense", EG, EG8]
    assert bold(table, "badnets", "ACC") == [True, False, False]   # highest ACC: undefended
    assert bold(table, "badnets", "ASR") == [False, True, False]   # undefended does not compete
    assert bold(table, "badnets", "RA") == [False, False, True]
    # DER: (0 - 0.02 + 1) / 2 = 49.00 against (0 - 0.04 + 1) / 2 = 48.00 (ASR rose: ΔASR < 0)
    assert texts(table, "badnets", "DER") == ["-", "49.00", "48.00"]
    assert bold(table, "badnets", "DER") == [False, True, False]
    markdown = format_source_markdown([table])
    assert "| badnets§ | ACC | **90.00** | 88.00 | 86.00 |" in markdown  # ASR 1%: not learned
    assert "|  | ASR | 1.00 | **5.00** | 20.00 |" in markdown
    assert "|  | DER | - | **49.00** | 48.00 |" in markdown


def test_ties_are_all_bold_and_a_lone_competitor_is_not(store):
    add_run(store, "n", evaluations={"triggered": (0.88, 1.0, 0.0)})
    add_run(store, "a", defense="eigenguard", k=32, evaluations={"running": (0.88, 0.3, 0.5)})
    add_run(store, "b", defense="eigenguard", k=8, evaluations={"running": (0.87999, 0.3, 0.6)})
    [table] = source_tables(store, None)
    assert bold(table, "badnets", "ACC") == [True, True, True]  # equal as shown: 88.00
    assert bold(table, "badnets", "ASR") == [False, True, True]
    [single] = source_tables(store, [r for r in store.find_runs() if r.key != "b"])
    assert bold(single, "badnets", "ASR") == [False, False]  # one defense: nothing to compare


def test_tuning_attacks_carry_a_dagger_and_a_footnote(store):
    for attack in ("badnets", "blended"):
        add_run(store, attack, attack=attack, evaluations={"triggered": (0.9, 1.0, 0.0)})
    [table] = source_tables(store, None, tuning_attacks=["badnets"])
    assert [r.attack_label for r in table.rows if r.metric == "ACC"] == ["badnets†", "blended"]
    assert TUNING_NOTE in table.footnotes
    markdown = format_source_markdown([table])
    assert "| badnets† | ACC |" in markdown and "| blended | ACC |" in markdown
    assert "† tuning attack: used to choose settings on the validation split" in markdown
    [plain] = source_tables(store, None)
    assert TUNING_NOTE not in plain.footnotes and "†" not in format_source_markdown([plain])


def test_batch_dependent_defenses_name_their_protocol(store):
    add_run(store, "n", evaluations={"triggered": (0.9, 1.0, 0.0)})
    add_run(store, "e", defense="eigenguard",
            evaluations={"triggered": (0.80, 0.40, 0.5), "mixed": (0.81, 0.90, 0.1),
                         "single": (0.70, 1.00, 0.0), "running": (0.85, 0.05, 0.8)})
    [table] = source_tables(store, None)
    undefended, guarded = table.columns
    assert undefended.header == "No defense" and not undefended.batch_dependent
    assert guarded.protocol == "running" and guarded.header == f"{EG} [running]‡"
    assert texts(table, "badnets", "ASR")[1] == "5.00"
    assert any(note.startswith("‡ [running]") for note in table.footnotes)
    markdown = format_source_markdown([table])
    assert f"| No defense | {EG} [running]‡ |" in markdown
    [mixed] = source_tables(store, None, protocol="mixed")
    assert mixed.columns[1].header == f"{EG} [mixed]‡" and mixed.columns[0].protocol == "triggered"
    assert texts(mixed, "badnets", "ASR") == ["100.00", "90.00"]
    assert any(note.startswith("‡ [mixed]") for note in mixed.footnotes)
    with pytest.raises(ValueError, match="unknown evaluation protocol"):
        source_tables(store, None, protocol="sideways")


def test_without_running_statistics_the_triggered_protocol_is_named(store):
    add_run(store, "e", defense="eigenguard",
            evaluations={"triggered": (0.80, 0.40, 0.5), "mixed": (0.81, 0.90, 0.1)})
    [table] = source_tables(store, None)
    assert table.columns[0].header == f"{EG} [triggered]‡"
    assert texts(table, "badnets", "ASR") == ["40.00"]


def test_one_seed_shows_the_value_and_n_differing_across_cells_is_shown(store):
    add_run(store, "n0", seed=0, evaluations={"triggered": (0.9, 1.0, 0.0)})
    [one] = source_tables(store, None)
    assert texts(one, "badnets", "ACC") == ["90.00"] and "n = 1 seed per cell" in one.caption
    add_run(store, "n1", seed=1, evaluations={"triggered": (0.8, 1.0, 0.0)})
    add_run(store, "e0", seed=0, defense="eigenguard", evaluations={"running": (0.85, 0.1, 0.5)})
    [table] = source_tables(store, None)
    assert table.uniform_n is None and "seeds per cell differ" in table.caption
    assert texts(table, "badnets", "ACC") == ["85.00 ± 7.07 (n=2)", "85.00 (n=1)"]
    assert "| badnets | ACC | **85.00 ± 7.07** (n=2) | **85.00** (n=1) |" in \
        format_source_markdown([table])  # equal means as shown: both bold


def test_one_table_per_setting_and_the_split_is_chosen(store):
    for ratio in (0.1, 0.01):
        add_run(store, f"n{ratio}", ratio=ratio, evaluations={"triggered": (0.9, 1.0, 0.0)})
        add_run(store, f"v{ratio}", ratio=ratio, seed=5, split="validation",
                evaluations={"triggered": (0.7, 0.5, 0.0)})
    tables = source_tables(store, None)
    assert [t.setting["poison_ratio"] for t in tables] == [0.01, 0.1]  # ordered by the ratio
    assert "poison 1%" in tables[0].caption and "poison 10%" in tables[1].caption
    assert texts(tables[0], "badnets", "ACC") == ["90.00"]
    validation = source_tables(store, None, split="validation")
    assert [texts(t, "badnets", "ACC") for t in validation] == [["70.00"], ["70.00"]]
    assert all("validation split" in t.caption for t in validation)
    markdown = format_source_markdown(tables)
    assert markdown.count("**Table ") == 2 and "Cells: mean ± sample standard deviation" in markdown
    assert format_source_markdown([]) == "no finished runs in the store"


def test_an_attack_the_undefended_model_did_not_learn_is_marked(store):
    from eigenguard.report_tables import UNLEARNED_NOTE
    for seed, asr in ((0, 0.03), (1, 0.60)):  # mean 31.5%: below 50, not learned
        add_run(store, f"n{seed}", seed=seed, evaluations={"triggered": (0.88, asr, 0.85)})
        add_run(store, f"e{seed}", seed=seed, defense="eigenguard",
                evaluations={"running": (0.80, 0.02, 0.78)})
    for seed in (0, 1):  # blended: learned (ASR 99%)
        add_run(store, f"b{seed}", seed=seed, attack="blended",
                evaluations={"triggered": (0.88, 0.99, 0.0)})
    [table] = source_tables(store, None)
    labels = {r.attack_label for r in table.rows}
    assert labels == {"badnets§", "blended"}
    assert UNLEARNED_NOTE in table.footnotes
    assert "badnets§" in format_source_markdown([table])


def test_runs_below_their_papers_budget_are_marked_and_named(store):
    """A defense or attack whose settings fall short of its paper's budget (DBD's SimCLR epochs,
    LC's PGD steps) is marked ° in the table and its reduced settings are listed."""
    for key, attack, defense in (("n", "lc", "none"), ("d", "lc", "dbd"), ("b", "badnets", "none"),
                                 ("f", "badnets", "fp")):
        add_run(store, key, attack=attack, defense=defense,
                evaluations={"triggered": (0.8, 0.5, 0.4)})
    [table] = source_tables(store, None)
    assert [c.name for c in table.columns] == ["No defense", "dbd°", "fp"]
    assert {row.attack_label for row in table.rows} == {"lc°", "badnets"}
    [note] = [n for n in table.footnotes if n.startswith("°")]
    assert ("lc: steps 20 (paper 100), helper_steps 3 (paper 7), helper_epochs 4 (paper 200); "
            "dbd: ssl_epochs 8 (paper 100), semi_epochs 4 (paper 190)") in note
    assert "fp" not in note and "badnets" not in note
    assert "| No defense | dbd° | fp |" in format_source_markdown([table])


def test_variants_of_one_attack_are_labelled_by_the_settings_that_differ_from_its_defaults(store):
    """One run stores every WaNet setting at its default, another none: the same variant, one
    row named by its defaults; the s = 1.0 run is a second row, named by that setting alone."""
    every = {f.name: getattr(create_attack("wanet"), f.name)
             for f in dataclasses.fields(create_attack("wanet"))}
    assert not changed_settings(create_attack("wanet", **every))
    add_run(store, "a", attack="wanet", attack_settings=every,
            evaluations={"triggered": (0.80, 0.30, 0.5)})
    add_run(store, "b", attack="wanet", seed=1, evaluations={"triggered": (0.82, 0.40, 0.5)})
    add_run(store, "c", attack="wanet", attack_settings={"s": 1.0},
            evaluations={"triggered": (0.84, 0.97, 0.0)})
    [table] = source_tables(store, None)
    assert sorted({r.attack for r in table.rows}) == ["wanet", "wanet(s=1.0)"]
    assert texts(table, "wanet", "ASR") == ["35.00 ± 7.07 (n=2)"]
    assert texts(table, "wanet(s=1.0)", "ASR") == ["97.00 (n=1)"]
