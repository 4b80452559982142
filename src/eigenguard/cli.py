"""Command line: ``eigenguard run | evaluate | report | list``."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

from . import __version__
from .attacks import list_attacks
from .data import list_datasets
from .defenses import list_defenses
from .defenses.eigenguard import EigenGuardDefense
from .errors import EigenGuardError
from .evaluate import PROTOCOLS, protocols_for
from .experiment import PRESETS, RunConfig, evaluate_and_store, load_data, load_run_model, run
from .models import list_models
from .report import (SUMMARY_COLUMNS, WIDE_COLUMNS, format_table, result_rows, select_runs,
                     summary_rows, wide_rows)
from .store import ResultStore, default_store_path
from .train import SCHEDULES, TrainConfig


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
    parser.add_argument("--defense", default=defaults.defense)
    eg = EigenGuardDefense  # the help names the defense's own defaults
    parser.add_argument("--k", type=int, help=f"EigenGuard: dominant directions (default {eg.k})")
    parser.add_argument("--tail-scale", type=float,
                        help=f"EigenGuard: tail factor (default {eg.tail_scale:g})")
    parser.add_argument("--scale", choices=("kth", "mean"),
                        help=f"EigenGuard: common scale (default {eg.scale})")
    parser.add_argument("--after", help=f"EigenGuard: module to insert it after (default "
                        f"{eg.after}, the first stage of the ResNets)")
    parser.add_argument("--eval-mode", choices=("batch", "running", "identity"),
                        help=f"EigenGuard at evaluation time (default {eg.eval_mode})")
    parser.add_argument("--stats-every", type=int, help="EigenGuard: fold one training batch in "
                        f"every N into the running statistics (default {eg.stats_every})")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--schedule", choices=SCHEDULES)
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--train-size", type=int, help="train on a seeded random subset")
    parser.add_argument("--test-size", type=int, help="evaluate on a seeded random subset")
    parser.add_argument("--force", action="store_true", help="rerun even if the store has it")


#: run flags that set the EigenGuard defense, by their argparse names
EIGENGUARD_FLAGS = ("k", "tail_scale", "scale", "after", "eval_mode", "stats_every")


def config_from_args(args) -> RunConfig:
    preset = dict(PRESETS[args.preset])
    train = dataclasses.asdict(preset.pop("train", TrainConfig()))
    for name in ("epochs", "batch_size", "lr", "schedule"):
        if getattr(args, name) is not None:
            train[name] = getattr(args, name)
    if args.no_augment:
        train["augment"] = False
    defense_settings = {}
    given = [name for name in EIGENGUARD_FLAGS if getattr(args, name) is not None]
    if args.defense == "eigenguard":
        defense_settings = {name: getattr(args, name) for name in given}
    elif given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise EigenGuardError(f"{flags} set EigenGuard; add --defense eigenguard")
    width = args.width if args.width is not None else preset.pop("width", RunConfig.width)
    preset.pop("width", None)
    return RunConfig(dataset=args.dataset, model=args.model, width=width, attack=args.attack,
                     poison_ratio=args.poison_ratio, target=args.target, defense=args.defense,
                     defense_settings=defense_settings, train=TrainConfig(**train),
                     seed=args.seed, train_size=args.train_size, test_size=args.test_size,
                     **preset)


def cmd_run(args) -> int:
    config = config_from_args(args)
    store = ResultStore(args.store)
    result = run(config, store, device=_device(args.device), data_root=args.data_root,
                 force=args.force, progress=not args.quiet)
    if result.cached:
        print(f"[{result.key}] already in {store.path}; stored result (use --force to rerun):")
    else:
        print(f"[{result.key}] finished in {result.wall_seconds:.0f}s, stored in {store.path}")
    print(format_table(result_rows(store, [store.get_run(result.key)])))
    return 0


def cmd_evaluate(args) -> int:
    store = ResultStore(args.store, create=False)
    matches = store.find_runs(args.run)
    finished = [r for r in matches if r.status == "finished"]
    if len(finished) != 1:
        raise EigenGuardError(f"--run {args.run!r} matches {len(finished)} finished runs; give "
                              "a longer key prefix (see `eigenguard report`)")
    stored = finished[0]
    config = RunConfig.from_dict(stored.config)
    _, test_set = load_data(config, args.data_root)
    model = load_run_model(stored, test_set)
    protocols = protocols_for(model) if args.protocol == "all" else (args.protocol,)
    evaluate_and_store(store, stored.key, config, model, test_set, protocols,
                       device=_device(args.device), progress=not args.quiet,
                       eval_seed=args.eval_seed)
    print(format_table(result_rows(store, [stored])))
    return 0


def cmd_report(args) -> int:
    store = ResultStore(args.store, create=False)
    selected = args.run or args.where or args.sort
    runs = select_runs(store, args.run, args.where, args.sort) if selected else None
    if runs == []:
        prefixes = [f"key prefix {' or '.join(map(repr, args.run))}"] if args.run else []
        print("no stored run matches " + " and ".join(prefixes + args.where))
        return 1
    if args.wide:
        print(format_table(wide_rows(store, runs), WIDE_COLUMNS, markdown=args.markdown))
    elif args.over_seeds:
        print(format_table(summary_rows(store, runs), SUMMARY_COLUMNS, markdown=args.markdown))
    else:
        print(format_table(result_rows(store, runs), markdown=args.markdown))
    return 0


def cmd_list(args) -> int:
    for title, names in (("data sets", list_datasets()), ("models", list_models()),
                         ("attacks", list_attacks()), ("defenses", list_defenses()),
                         ("protocols", list(PROTOCOLS))):
        print(f"{title}: {', '.join(names)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eigenguard", description=__doc__)
    parser.add_argument("--version", action="version", version=f"eigenguard {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("run", help="poison, train (with a defense), evaluate, store")
    _add_run_arguments(p)
    _add_common(p)
    p.set_defaults(handler=cmd_run)
    p = commands.add_parser("evaluate", help="evaluate a stored run's checkpoint again")
    p.add_argument("--run", required=True, help="run key or a unique prefix of it")
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
    view = p.add_mutually_exclusive_group()
    view.add_argument("--wide", action="store_true",
                      help="one row per run, ACC / ASR of every protocol side by side")
    view.add_argument("--over-seeds", action="store_true",
                      help="one row per setup over its seeds: mean ACC / ASR, the ASR's range "
                           "and the mean DER of every protocol")
    p.add_argument("--store", default=None)
    p.set_defaults(handler=cmd_report)
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
    except (EigenGuardError, ValueError, TypeError, FileNotFoundError) as error:
        if os.environ.get("EIGENGUARD_DEBUG"):
            raise
        print(f"eigenguard: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
