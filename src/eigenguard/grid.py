"""A benchmark grid read from YAML: the product of its axes plus explicit rows, as RunConfigs.

A grid file names what a sweep runs and how its report reads::

    name: smoke
    description: BadNets and Blended, no defense and EigenGuard, one seed
    tuning_attacks: [badnets]        # marked apart from the held-out attacks in reports
    protocols: [triggered, running]  # evaluation protocols (default: each defense's own)
    setup:                           # shared by every run: any SetupConfig field, train: {...}
      train_size: 12000
      train: {epochs: 4}
    datasets: [fashion-mnist]
    models: [preact_resnet18, {name: small_cnn, width: 8}]
    attacks: [badnets, {name: blended, settings: {alpha: 0.2}}]
    defenses: [none, eigenguard, {name: eigenguard, settings: {k: 16}}]
    poison_ratios: [0.01, 0.1]
    seeds: [0, 1, 2]
    blocks:                          # more products, each over `setup`; an axis a block does
      - defenses: [abl, ss]          #   not name takes the grid's own
        poison_ratios: [0.1]
        seeds: [0]
    extra:                           # explicit rows, each over `setup` (and the first of each axis)
      - {attack: badnets, defense: eigenguard, defense_settings: {k: 64}, seed: 0}

Every config is built and validated when the grid is read, so a typo fails before any data
loads or any run starts.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from .errors import EigenGuardError
from .evaluate import check_protocol
from .experiment import RunConfig, SetupConfig
from .train import TrainConfig

AXES = {"datasets": "dataset", "models": "model", "attacks": "attack", "defenses": "defense",
        "poison_ratios": "poison_ratio", "seeds": "seed"}
GRID_KEYS = ("name", "description", "tuning_attacks", "protocols", "setup", "blocks", "extra",
             *AXES)
SETUP_FIELDS = {f.name for f in dataclasses.fields(SetupConfig)}
ROW_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}


class GridError(EigenGuardError, ValueError):
    """A grid file that cannot be read or names something that does not exist."""


@dataclass(frozen=True)
class Grid:
    name: str
    configs: tuple[RunConfig, ...]
    description: str = ""
    tuning_attacks: tuple[str, ...] = ()
    protocols: tuple[str, ...] | None = None
    source: str | None = None  # the file it was read from
    sizes: dict = field(default_factory=dict)  # axis -> number of values, for messages

    def __len__(self) -> int:
        return len(self.configs)

    def only(self, filters: dict[str, set[str]]) -> "Grid":
        """The runs whose fields match every filter (field -> accepted values, compared as
        text: ``{"attack": {"badnets"}, "seed": {"0"}}``), to run a slice of a grid first.
        A field no run has, or a filter that leaves nothing, is an error naming what exists."""
        kept = self.configs
        for name, accepted in filters.items():
            if not all(hasattr(config, name) for config in self.configs):
                raise GridError(f"--only {name}=...: runs have no field {name!r}; use one of "
                                f"{', '.join(ONLY_FIELDS)}")
            kept = tuple(config for config in kept if str(getattr(config, name)) in accepted)
            if not kept:
                values = sorted({str(getattr(config, name)) for config in self.configs})
                raise GridError(f"--only {name}={','.join(sorted(accepted))} leaves no run of "
                                f"grid {self.name!r}: its {name} values are {', '.join(values)}")
        return replace(self, configs=kept)


#: the run fields a slice of a grid is usually chosen by (``Grid.only`` accepts any field)
ONLY_FIELDS = ("attack", "defense", "poison_ratio", "seed", "model", "dataset")


def parse_only(items) -> dict[str, set[str]]:
    """``["attack=badnets,blended", "seed=0"]`` as ``{"attack": {...}, "seed": {"0"}}``."""
    filters: dict[str, set[str]] = {}
    for item in items or ():
        name, sep, values = item.partition("=")
        if not sep or not name.strip() or not values.strip():
            raise GridError(f"--only {item!r}: write FIELD=VALUE[,VALUE...], e.g. "
                            "attack=badnets or seed=0,1")
        filters.setdefault(name.strip(), set()).update(v.strip() for v in values.split(","))
    return filters


def _named(value, what: str, setting_key: str) -> dict:
    """An axis entry as fields: ``"badnets"`` or ``{name: blended, settings: {...}}``."""
    if isinstance(value, str):
        return {what: value}
    if isinstance(value, dict) and "name" in value:
        unknown = set(value) - {"name", "settings", "width"}
        if unknown or ("width" in value and what != "model") or (
                "settings" in value and what == "model"):
            raise GridError(f"a {what} entry takes name and "
                            f"{'width' if what == 'model' else 'settings'}; got {sorted(value)}")
        entry = {what: value["name"]}
        if "settings" in value:
            if not isinstance(value["settings"], dict):
                raise GridError(f"the settings of {what} {value['name']!r} must be a mapping, "
                                f"got {value['settings']!r}")
            entry[setting_key] = dict(value["settings"])
        if "width" in value:
            entry["width"] = value["width"]
        return entry
    raise GridError(f"a {what} entry is a name or {{name: ..., "
                    f"{'width' if what == 'model' else 'settings'}: ...}}; got {value!r}")


def _axis_entries(axis: str, values) -> list[dict]:
    if not isinstance(values, list) or not values:
        raise GridError(f"{axis} must be a non-empty list, got {values!r}")
    what = AXES[axis]
    if what in ("attack", "defense", "model"):
        return [_named(value, what, f"{what}_settings") for value in values]
    return [{what: value} for value in values]


def _config(fields: dict, where: str) -> RunConfig:
    unknown = set(fields) - ROW_FIELDS
    if unknown:
        raise GridError(f"{where}: unknown field(s) {sorted(unknown)}; a run takes "
                        f"{sorted(ROW_FIELDS)}")
    fields = dict(fields)
    train = fields.get("train", {})
    if isinstance(train, dict):
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        if set(train) - known:
            raise GridError(f"{where}: unknown train setting(s) {sorted(set(train) - known)}; "
                            f"train takes {sorted(known)}")
        fields["train"] = TrainConfig(**train)
    try:
        config = RunConfig(**fields)
        config.validate()
    except (TypeError, ValueError, EigenGuardError) as error:
        raise GridError(f"{where}: {error}") from None
    return config


def _product(setup: dict, axes: dict, label: str) -> list[RunConfig]:
    """Every combination of the axes' entries, each over ``setup``."""
    configs = []
    for combination in itertools.product(*axes.values()):
        fields = dict(setup)
        for entry in combination:
            fields.update(entry)
        configs.append(_config(fields, f"{label}, run {len(configs) + 1}"))
    return configs


def grid_from_dict(data: dict, source: str | None = None) -> Grid:
    """Build and validate every config of a grid given as plain data (a parsed YAML file)."""
    label = source or "the grid"
    if not isinstance(data, dict):
        raise GridError(f"{label} must be a mapping with keys such as attacks and defenses")
    unknown = set(data) - set(GRID_KEYS)
    if unknown:
        raise GridError(f"{label}: unknown key(s) {sorted(unknown)}; a grid takes "
                        f"{list(GRID_KEYS)}")
    setup = dict(data.get("setup") or {})
    if set(setup) - SETUP_FIELDS:
        raise GridError(f"{label}: setup takes SetupConfig fields {sorted(SETUP_FIELDS)}; "
                        f"unknown: {sorted(set(setup) - SETUP_FIELDS)}")
    try:
        axes = {axis: _axis_entries(axis, data[axis]) for axis in AXES if axis in data}
    except GridError as error:
        raise GridError(f"{label}: {error}") from None
    configs: list[RunConfig] = []
    if axes:
        configs += _product(setup, axes, label)
    for number, block in enumerate(data.get("blocks") or [], 1):
        where = f"{label}, block {number}"
        if not isinstance(block, dict) or not block or set(block) - set(AXES):
            raise GridError(f"{where} must be a mapping of axes ({', '.join(AXES)}), got "
                            f"{block!r}")
        try:
            own = {axis: _axis_entries(axis, block[axis]) for axis in block}
        except GridError as error:
            raise GridError(f"{where}: {error}") from None
        configs += _product(setup, {**axes, **own}, where)
    first = {axis: entries[0] for axis, entries in axes.items()}
    for number, row in enumerate(data.get("extra") or [], 1):
        if not isinstance(row, dict):
            raise GridError(f"{label}: extra row {number} must be a mapping, got {row!r}")
        fields = dict(setup)
        for entry in first.values():
            fields.update(entry)
        if "attack" in row and "attack_settings" not in row:
            fields.pop("attack_settings", None)
        if "defense" in row and "defense_settings" not in row:
            fields.pop("defense_settings", None)
        fields.update(row)
        configs.append(_config(fields, f"{label}, extra row {number}"))
    if not configs:
        raise GridError(f"{label} holds no run: give axes (attacks, defenses, ...) or extra rows")
    unique = list(dict.fromkeys(configs))  # a row repeated by the axes and extra runs once
    protocols = data.get("protocols")
    if protocols is not None:
        if not isinstance(protocols, list) or not protocols:
            raise GridError(f"{label}: protocols must be a non-empty list")
        for protocol in protocols:
            try:
                check_protocol(protocol)
            except ValueError as error:
                raise GridError(f"{label}: {error}") from None
    tuning = data.get("tuning_attacks") or []
    if not isinstance(tuning, list):
        raise GridError(f"{label}: tuning_attacks must be a list of attack names")
    name = data.get("name") or (Path(source).stem if source else "grid")
    return Grid(str(name), tuple(unique), str(data.get("description") or ""),
                tuple(tuning), tuple(protocols) if protocols else None, source,
                {axis: len(entries) for axis, entries in axes.items()})


def load_grid(path) -> Grid:
    """Read a grid file; every run in it is validated here."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"no grid file at {path}: give the path of a YAML grid (ready ones are "
                        "in benchmarks/grids/)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise GridError(f"{path} is not valid YAML: {error}") from None
    return grid_from_dict(data, str(path))
