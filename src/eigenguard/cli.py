"""Command line: ``eigenguard run | sweep | evaluate | report | export | import | gallery |
list``."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sqlite3
import sys

import torch

from . import __version__
from .attacks import POISON_POOLS, list_attacks
from .attacks.base import LABEL_MODES
from .attacks.registry import ATTACKS
from .data import list_datasets
from .defenses import list_defenses
from .defenses.registry import DEFENSES
from .errors import EigenGuardError
from .evaluate import PROTOCOLS
from .experiment import PRESETS, RunConfig, reevaluate, run
from .settings import SettingError, coerce, declared_types, parse_assignment
from .models import list_models
from .report import (COLUMNS, SUMMARY_COLUMNS, WIDE_COLUMNS, format_table, result_rows,
                     select_runs, summary_rows, wide_rows)
from .store import ResultStore, default_store_path
from .train import SCHEDULES, TrainConfig


get_attack, get_defense = ATTACKS.get, DEFENSES.get


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _add_common(parser):
    parser.add_argument("--store", default=None,
                        help=f"result store (default $EIGENGUARD_STORE or {default_store_path()})")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default auto)")
    parser.add_argument("--data-root", default=None, help="folder holding the data set's files")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_save_every(parser, more: str):
    parser.add_argument("--save-every", type=int, default=None, metavar="N",
                        help="keep the model's weights every N epochs of training on the "
                             "poisoned set, and at the end (not part of the run's key); " + more)


def _defense_shortcuts() -> dict[str, dict[str, object]]:
    """``--NAME`` flags generated from the registered defenses' declared settings:
    setting name -> {defense: its default}."""
    shortcuts: dict[str, dict[str, object]] = {}
    for name in list_defenses():
        for field in dataclasses.fields(get_defense(name)):
            shortcuts.setdefault(field.name, {})[name] = field.default
    return shortcuts


def _add_run_arguments(parser):
    defaults = RunConfig()
    parser.add_argument("--preset", choices=sorted(PRESETS), default="fast",
                        help="fast: width 16, 4 epochs, one-cycle lr 0.05 (CPU); backdoorbench: "
                             "width 64, 100 epochs, SGD lr 0.01 cosine (GPU). Flags override it.")
    parser.add_argument("--dataset", default=defaults.dataset, choices=list_datasets())
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument("--width", type=int)
    parser.add_argument("--attack", default=defaults.attack)
    parser.add_argument("--poison-ratio", type=float, default=defaults.poison_ratio)
    parser.add_argument("--target", type=int, default=defaults.target)
    parser.add_argument("--poison-pool", choices=POISON_POOLS, default=defaults.poison_pool,
                        help="where dirty-label attacks draw their samples: all (BackdoorBench; "
                             "about 1/C of them keep their label) or non-target")
    parser.add_argument("--label-mode", choices=LABEL_MODES, default=defaults.label_mode,
                        help="all-to-one (default): every poisoned sample relabelled to "
                             "--target; all-to-all: class y to (y + 1) mod C, drawn from every "
                             "class, and ASR counts a triggered image as a success when "
                             "predicted as its own y + 1")
    parser.add_argument("--defense", default=defaults.defense)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.NAME=VALUE",
                        dest="assignments",
                        help="any attack, defense or training setting, typed by its declaration, "
                             "e.g. --set attack.alpha=0.1 --set defense.k=8 --set train.epochs=2 "
                             "(repeatable)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--schedule", choices=SCHEDULES)
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--train-size", type=int, help="use a seeded random subset of the "
                        "training set (before the validation split and the clean reserve)")
    parser.add_argument("--test-size", type=int, help="evaluate on a seeded random subset")
    parser.add_argument("--validation-fraction", type=float, default=defaults.validation_fraction,
                        help="share of the training set held out for tuning (default 0.1)")
    parser.add_argument("--reserve-fraction", type=float, default=defaults.reserve_fraction,
                        help="share of the training set kept clean for defenses with clean-data "
                             "rights (default 0.05)")
    parser.add_argument("--force", action="store_true",
                        help="remove the stored run (metrics, checkpoint) and run it again")
    shortcuts = parser.add_argument_group(
        "defense settings", "shortcuts for --set defense.NAME=VALUE, one per declared setting")
    for name, by_defense in _defense_shortcuts().items():
        if "--" + name.replace("_", "-") in parser._option_string_actions:
            continue  # a run flag of that name exists: use --set defense.NAME=VALUE
        owners = ", ".join(f"{d} {v!r}" for d, v in by_defense.items())
        shortcuts.add_argument("--" + name.replace("_", "-"), dest="defense_" + name,
                               metavar="VALUE", help=f"default: {owners}")


def config_from_args(args) -> RunConfig:
    """The run's config from the flags; every setting is typed and checked here."""
    preset = dict(PRESETS[args.preset])
    train = dataclasses.asdict(preset.pop("train", TrainConfig()))
    for name in ("epochs", "batch_size", "lr", "schedule"):
        if getattr(args, name) is not None:
            train[name] = getattr(args, name)
    if args.no_augment:
        train["augment"] = False
    settings = {"attack": {}, "defense": {}, "train": train}
    sections = {"attack": get_attack(args.attack), "defense": get_defense(args.defense),
                "train": TrainConfig}
    shortcuts = _defense_shortcuts()
    defense_fields = declared_types(sections["defense"])
    for name, by_defense in shortcuts.items():
        text = getattr(args, "defense_" + name, None)
        if text is None:
            continue
        flag = "--" + name.replace("_", "-")
        if name not in defense_fields:
            owners = ", ".join(f"--defense {d}" for d in by_defense)
            raise EigenGuardError(f"{flag} is a setting of {owners.replace('--defense ', '')}, "
                                  f"not of {args.defense}; add {owners.split(', ')[0]}")
        settings["defense"][name] = coerce(text, defense_fields[name], flag)
    for text in args.assignments:
        section, name, value = parse_assignment(text, sections)
        settings[section][name] = value
    width = args.width if args.width is not None else preset.pop("width", RunConfig.width)
    preset.pop("width", None)
    return RunConfig(dataset=args.dataset, model=args.model, width=width, attack=args.attack,
                     attack_settings=settings["attack"], poison_ratio=args.poison_ratio,
                     target=args.target, poison_pool=args.poison_pool,
                     label_mode=args.label_mode, defense=args.defense,
                     defense_settings=settings["defense"], train=TrainConfig(**settings["train"]),
                     seed=args.seed, train_size=args.train_size, test_size=args.test_size,
                     validation_fraction=args.validation_fraction,
                     reserve_fraction=args.reserve_fraction, **preset)


def cmd_run(args) -> int:
    config = config_from_args(args)
    config.validate()
    store = ResultStore(args.store)
    result = run(config, store, device=_device(args.device), data_root=args.data_root,
                 force=args.force, progress=not args.quiet, save_every=args.save_every)
    if result.cached:
        print(f"[{result.key}] already in {store.path}; stored result (use --force to rerun):")
    elif result.status == "finished":
        print(f"[{result.key}] finished in {result.wall_seconds:.0f}s, stored in {store.path}")
    else:
        print(f"[{result.key}] trained and stored in {store.path}, but its evaluation failed: "
              f"{result.error}\nthe model is kept; evaluate it again with `eigenguard evaluate "
              f"--run {result.key[:8]} --protocol PROTOCOL`", file=sys.stderr)
    print(format_table(result_rows(store, [store.get_run(result.key)])))
    return 0 if result.status == "finished" else 1


def cmd_sweep(args) -> int:
    from .grid import load_grid, parse_only
    from .sweep import dry_run_lines, plan, sweep

    grid = load_grid(args.grid)
    if args.only:
        grid = grid.only(parse_only(args.only))
    store = ResultStore(args.store)
    if args.dry_run:
        planned, _ = plan(grid, store, data_root=args.data_root, retry_failed=args.retry_failed)
        print("\n".join(dry_run_lines(grid, planned)))
        return 0
    executor = None
    if args.executor == "ray":
        from .sweep_ray import RayExecutor
        executor = RayExecutor(address=args.address, cpus_per_run=args.cpus_per_run,
                               gpus_per_run=args.gpus_per_run)
    summary = sweep(grid, store, executor=executor, data_root=args.data_root,
                    device=_device(args.device), retry_failed=args.retry_failed,
                    progress=not args.quiet)
    return 1 if summary.failed else 0


def cmd_evaluate(args) -> int:
    store = ResultStore(args.store, create=False)
    matches = [r for r in store.find_runs(args.run)
               if r.status in ("finished", "evaluation-failed")]
    if len(matches) != 1:
        raise EigenGuardError(f"--run {args.run!r} matches {len(matches)} trained runs; give "
                              "a longer key prefix (see `eigenguard report`)")
    stored = matches[0]
    protocols = None if args.protocol == "all" else (args.protocol,)
    reevaluate(store, stored, data_root=args.data_root, protocols=protocols,
               eval_seed=args.eval_seed, device=_device(args.device), progress=not args.quiet)
    print(format_table(result_rows(store, [store.get_run(stored.key)])))
    return 0


def cmd_report(args) -> int:
    from .transfer import open_results

    store = open_results(args.store or default_store_path())
    tuning = list(args.tuning)
    selected = args.run or args.where or args.sort
    runs = select_runs(store, args.run, args.where, args.sort) if selected else None
    if args.grid:
        from .grid import load_grid

        grid_keys = {r.key for r in grid_runs(store, args.grid, args.data_root)}
        runs = [r for r in (runs if runs is not None else store.find_runs())
                if r.key in grid_keys]
        tuning += [a for a in load_grid(args.grid).tuning_attacks if a not in tuning]
    if runs == []:
        prefixes = [f"key prefix {' or '.join(map(repr, args.run))}"] if args.run else []
        grid = [f"a run of the grid {args.grid} (its keys depend on the data: pass --data-root "
                "if the runs used other files)"] if args.grid else []
        print("no stored run matches " + " and ".join(prefixes + args.where + grid))
        return 1
    if args.html or args.figures:
        from .report_html import plot_files, write_html_report

        if args.html:
            path = write_html_report(store, runs, args.html, title=args.title,
                                     command=["eigenguard", *sys.argv[1:]], split=args.split,
                                     tuning_attacks=tuning, protocol=args.protocol)
            print(f"wrote {path}", file=sys.stderr)
        if args.figures:
            for path in plot_files(store, runs, args.figures, split=args.split,
                                   tuning_attacks=tuning, protocol=args.protocol):
                print(f"wrote {path}", file=sys.stderr)
    if args.source_layout:
        from .report_cost import cost_rows, format_cost_markdown
        from .report_detection import detection_rows, format_detection_markdown
        from .report_tables import format_source_markdown, source_tables

        print(format_source_markdown(source_tables(store, runs, split=args.split,
                                                   tuning_attacks=tuning,
                                                   protocol=args.protocol)))
        detection = format_detection_markdown(detection_rows(store, runs))
        if detection:
            print("\n" + detection + "\n")
        print(format_cost_markdown(cost_rows(store, runs)))
        return 0
    if args.wide:
        rows, columns = wide_rows(store, runs, args.split), WIDE_COLUMNS
    elif args.over_seeds:
        rows, columns = summary_rows(store, runs, args.split), SUMMARY_COLUMNS
    else:
        rows, columns = result_rows(store, runs, args.split), COLUMNS
    print(format_table(rows, columns, markdown=args.markdown))
    return 0


def grid_runs(store: ResultStore, grid_path: str, data_root=None) -> list:
    """The stored runs of a grid file, in the grid's order."""
    from .grid import load_grid
    from .sweep import plan

    planned, _ = plan(load_grid(grid_path), store, data_root=data_root)
    return [item.stored for item in planned if item.stored is not None]


def cmd_export(args) -> int:
    from .transfer import export_runs

    store = ResultStore(args.store, create=False)
    runs = None
    if args.grid:
        runs = grid_runs(store, args.grid, args.data_root)
    if args.run or args.where:
        chosen = select_runs(store, args.run, args.where)
        runs = chosen if runs is None else [r for r in runs if r.key in {c.key for c in chosen}]
    count = export_runs(store, args.output, runs)
    print(f"exported {count} runs from {store.path} to {args.output} (metrics and histories; "
          "checkpoints stay in the store)")
    return 0


def cmd_import(args) -> int:
    from .transfer import import_runs

    store = ResultStore(args.store)
    summary = import_runs(store, args.files, replace=args.replace)
    print(f"{store.path}: {summary.describe()}")
    return 0


def cmd_analyze(args) -> int:
    from .analysis.analyze import analyze_run, markdown_table

    store = ResultStore(args.store, create=False)
    runs = []
    for prefix in args.runs:
        matches = [r for r in store.find_runs(prefix)
                   if r.status in ("finished", "evaluation-failed")]
        if len(matches) != 1:
            raise EigenGuardError(f"run {prefix!r} matches {len(matches)} trained runs; give a "
                                  "longer key prefix (see `eigenguard report`)")
        runs.append(matches[0])
    analyses = [analyze_run(store, run, out_dir=args.out, count=args.samples, k=args.k,
                            seed=args.seed, data_root=args.data_root,
                            device=_device(args.device), tsne=not args.no_tsne,
                            log=(lambda *a: None) if args.quiet else print,
                            save_every=args.save_every, progress=not args.quiet)
                for run in runs]
    print(markdown_table(analyses))
    for analysis in analyses:
        if analysis.over_training is not None:
            print("\n" + analysis.over_training.markdown())
    return 0


def cmd_gallery(args) -> int:
    """One PNG per attack: clean, poisoned and amplified-residual rows, and the trigger's size."""
    from .data import load_dataset
    from .gallery import (describe_attack, fit_subset, format_stats, gallery_images,
                          trigger_stats, write_gallery)

    names = list_attacks() if args.all or not args.attack else list(dict.fromkeys(args.attack))
    for name in names:
        get_attack(name)  # an unknown name fails before any data loads
    settings: dict = {}
    if args.assignments:
        if len(names) != 1:
            raise SettingError("gallery --set changes one attack's settings: name it with one "
                               f"--attack (got {len(names)} attacks)")
        for text in args.assignments:
            _, setting, value = parse_assignment(text, {"attack": get_attack(names[0])})
            settings[setting] = value
        get_attack(names[0])(**settings)  # a bad value fails before any data loads
    test = load_dataset(args.dataset, "test", root=args.data_root)
    images = gallery_images(test, args.count)
    train = None
    for name in names:
        attack = get_attack(name)(**settings)
        fitted_on = None
        if attack.needs_fit:
            if train is None:
                train = fit_subset(load_dataset(args.dataset, "train", root=args.data_root))
            attack.fit(train, seed=0)
            fitted_on = len(train)
        stats = trigger_stats(test.images, attack.apply(test.images))
        title = f"{describe_attack(name, attack, fitted_on)} on {args.dataset}"
        # a variant gets a file of its own: wanet-s1.0.png beside wanet.png
        stem = "-".join([name, *(f"{key}{value}" for key, value in settings.items())])
        path = write_gallery(attack, images, os.path.join(args.out, f"{stem}.png"), title,
                             stats=stats)
        print(f"{name}: {format_stats(stats)} -> {path}")
    return 0


def cmd_list(args) -> int:
    defenses = [f"{name} [{', '.join(get_defense(name).protocols)}]" for name in list_defenses()]
    for title, names in (("data sets", list_datasets()), ("models", list_models()),
                         ("attacks", list_attacks()), ("defenses [evaluation protocols]", defenses),
                         ("protocols", list(PROTOCOLS))):
        print(f"{title}: {', '.join(names)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eigenguard", description=__doc__)
    parser.add_argument("--version", action="version", version=f"eigenguard {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("run", help="poison, train (with a defense), evaluate, store")
    _add_run_arguments(p)
    _add_save_every(p, "a stored run without them (or with another N) is trained again")
    _add_common(p)
    p.set_defaults(handler=cmd_run)
    p = commands.add_parser("sweep", help="run a grid of runs from a YAML file (resumable)")
    p.add_argument("grid", help="the grid file (ready ones: benchmarks/grids/*.yaml)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the runs, which are stored already, and the estimated compute")
    p.add_argument("--retry-failed", action="store_true",
                   help="run failed runs again (re-evaluate those whose evaluation failed)")
    p.add_argument("--only", action="append", metavar="FIELD=VALUE[,VALUE...]",
                   help="run only the grid's runs with these values (repeatable, all must "
                        "match), e.g. --only attack=badnets --only seed=0; fields: attack, "
                        "defense, poison_ratio, seed, model, dataset")
    p.add_argument("--executor", choices=("in-process", "ray"), default="in-process",
                   help="in-process (default) or ray: each run a Ray task; only this process "
                        "writes the store")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: start a local Ray instance)")
    p.add_argument("--cpus-per-run", type=float, default=1, help="Ray CPUs per run (default 1)")
    p.add_argument("--gpus-per-run", type=float, default=0, help="Ray GPUs per run (default 0)")
    _add_common(p)
    p.set_defaults(handler=cmd_sweep)
    p = commands.add_parser("evaluate", help="evaluate a stored run's checkpoint again")
    p.add_argument("--run", required=True, help="run key or a unique prefix of it (a finished "
                   "run, or one whose evaluation failed)")
    p.add_argument("--protocol", choices=(*PROTOCOLS, "all"), default="all")
    p.add_argument("--eval-seed", type=int, default=0, help="seed of the mixed batches")
    _add_common(p)
    p.set_defaults(handler=cmd_evaluate)
    p = commands.add_parser("report", help="print the stored runs as a table")
    p.add_argument("--run", action="append", default=[],
                   help="only runs whose key starts with this (repeat for several runs)")
    p.add_argument("--where", action="append", default=[], metavar="PATH=VALUE",
                   help="only runs whose config has this value, e.g. poison_ratio=0.01 or "
                        "defense_settings.after=layer1 (repeat to combine)")
    p.add_argument("--sort", action="append", default=[], metavar="PATH",
                   help="order the runs by this config value, e.g. defense_settings.k (repeat: "
                        "the first one decides first; default: the order they started)")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--split", choices=("test", "validation"), default="test",
                   help="the split whose metrics are shown: test (reported results, the "
                        "default) or validation (the tuning set)")
    view = p.add_mutually_exclusive_group()
    view.add_argument("--wide", action="store_true",
                      help="one row per run, ACC / ASR of every protocol side by side")
    view.add_argument("--over-seeds", action="store_true",
                      help="one row per setup over its seeds: mean ACC / ASR, the ASR's range "
                           "and the mean DER of every protocol")
    view.add_argument("--source-layout", action="store_true",
                      help="the source's tables (Markdown): per setting, rows attack x metric, "
                           "columns defenses, mean ± std over seeds, DER, best marked")
    p.add_argument("--grid", help="only the runs of this grid file; its tuning attacks are marked")
    p.add_argument("--tuning", action="append", default=[], metavar="ATTACK",
                   help="mark ATTACK as a tuning attack (repeatable)")
    p.add_argument("--protocol", choices=PROTOCOLS, default=None,
                   help="the protocol shown for batch-dependent defenses in the source layout "
                        "(default: their batch-independent one, e.g. running)")
    p.add_argument("--html", metavar="FILE", help="also write one self-contained HTML page with "
                   "the source tables and plots")
    p.add_argument("--figures", metavar="FOLDER", help="also write the plots as PNG files")
    p.add_argument("--title", default="EigenGuard benchmark report", help="the HTML page's title")
    p.add_argument("--data-root", default=None, help="with --grid: the data set's folder")
    p.add_argument("--store", default=None, help="a result store, or JSON Lines results "
                   "(a .jsonl file or a folder of them, e.g. results/) read without retraining")
    p.set_defaults(handler=cmd_report)
    p = commands.add_parser("export", help="write stored runs and their metrics as JSON Lines")
    p.add_argument("output", help="the .jsonl file to write (replaced atomically)")
    p.add_argument("--grid", help="only the runs of this grid file")
    p.add_argument("--run", action="append", default=[], help="only runs with this key prefix")
    p.add_argument("--where", action="append", default=[], metavar="PATH=VALUE",
                   help="only runs whose config has this value (as in report)")
    p.add_argument("--data-root", default=None, help="with --grid: the data set's folder")
    p.add_argument("--store", default=None)
    p.set_defaults(handler=cmd_export)
    p = commands.add_parser("import", help="add runs from JSON Lines files to a store")
    p.add_argument("files", nargs="+", help=".jsonl files written by `eigenguard export`")
    p.add_argument("--replace", action="store_true",
                   help="replace stored runs that differ (default: keep them; a stored run "
                        "that is not finished is always replaced by a finished one)")
    p.add_argument("--store", default=None)
    p.set_defaults(handler=cmd_import)
    p = commands.add_parser("analyze", help="spectral analyses of stored runs: effective "
                            "rank, singular spectra, where the trigger lives, t-SNE")
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run keys or unique prefixes (trained runs with a checkpoint here)")
    p.add_argument("--out", default="analysis",
                   help="folder for the figures and numbers, one subfolder per run "
                        "(default ./analysis)")
    p.add_argument("--samples", type=int, default=1000,
                   help="images of each kind: clean, triggered, mix (default 1000)")
    p.add_argument("--k", type=int, default=None,
                   help="top directions to measure against (default: the run's EigenGuard k, "
                        "or 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the images drawn and t-SNE")
    p.add_argument("--no-tsne", action="store_true", help="skip the t-SNE figure (the slowest)")
    _add_save_every(p, "and add effective rank and ASR per kept epoch (the source's Figure 1); "
                       "a run without them is trained again first, with its own config")
    _add_common(p)
    p.set_defaults(handler=cmd_analyze)
    p = commands.add_parser("gallery", help="one PNG per attack: clean, poisoned and "
                            "residual images, with the trigger's L∞, L2 and PSNR")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--attack", action="append", default=[], metavar="NAME",
                       help="an attack to show (repeatable; default: every registered attack)")
    which.add_argument("--all", action="store_true", help="every registered attack")
    p.add_argument("--dataset", default=RunConfig.dataset, choices=list_datasets())
    p.add_argument("--count", type=int, default=8,
                   help="test images shown per row (default 8: one of each class in turn)")
    p.add_argument("--set", action="append", default=[], metavar="attack.NAME=VALUE",
                   dest="assignments",
                   help="a setting of the one --attack shown, e.g. --attack wanet --set "
                        "attack.s=1.0 (repeatable; the PNG is named wanet-s1.0.png)")
    p.add_argument("--out", default="gallery", help="folder for the PNGs (default ./gallery)")
    p.add_argument("--data-root", default=None, help="folder holding the data set's files")
    p.set_defaults(handler=cmd_gallery)
    p = commands.add_parser("list", help="data sets, models, attacks, defenses, protocols")
    p.set_defaults(handler=cmd_list)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("interrupted; finished runs stay in the store", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (EigenGuardError, ValueError, TypeError, FileNotFoundError,
            sqlite3.DatabaseError) as error:
        if os.environ.get("EIGENGUARD_DEBUG"):
            raise
        print(f"eigenguard: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
