"""Tables read back from the result store."""
from __future__ import annotations

from .evaluate import PROTOCOLS
from .store import ResultStore, StoredRun

COLUMNS = ("run", "dataset", "model", "attack", "poison", "defense", "epochs", "protocol",
           "eval batch", "ACC %", "ASR %", "RA %")


def _defense_label(run: StoredRun) -> str:
    name = run.config["defense"]
    settings = run.config.get("defense_settings") or {}
    if name == "eigenguard":
        return (f"eigenguard(k={settings.get('k')}, after={settings.get('after')}, "
                f"tail={settings.get('tail_scale')}, scale={settings.get('scale')})")
    return name


def result_rows(store: ResultStore, keys: list[str] | None = None) -> list[tuple]:
    """One row per (finished run, evaluation protocol), runs in the order they started."""
    runs = [store.get_run(k) for k in keys] if keys else store.find_runs()
    rows = []
    for run in runs:
        if run is None or run.status != "finished":
            continue
        config = run.config
        evaluations = sorted(store.evaluations(run.key),
                             key=lambda e: (PROTOCOLS.index(e["protocol"]), e["seed"]))
        for e in evaluations:
            rows.append((run.key[:8], config["dataset"], f"{config['model']}/{config['width']}",
                         config["attack"], f"{config['poison_ratio']:.0%}", _defense_label(run),
                         str(config["train"]["epochs"]), e["protocol"], str(e["batch_size"]),
                         f"{100 * e['acc']:.2f}", f"{100 * e['asr']:.2f}", f"{100 * e['ra']:.2f}"))
    return rows


def wide_rows(store: ResultStore, keys: list[str] | None = None) -> tuple[tuple, list[tuple]]:
    """One row per finished run, ACC / ASR (%) of every protocol side by side."""
    columns = ("run", "dataset", "model", "attack", "poison", "defense", "epochs",
               *(f"{p} ACC/ASR" for p in PROTOCOLS))
    runs = [store.get_run(k) for k in keys] if keys else store.find_runs()
    rows = []
    for run in runs:
        if run is None or run.status != "finished":
            continue
        config = run.config
        found = {e["protocol"]: e for e in store.evaluations(run.key) if e["seed"] == 0}
        cells = [f"{100 * found[p]['acc']:.2f} / {100 * found[p]['asr']:.2f}" if p in found
                 else "-" for p in PROTOCOLS]
        rows.append((run.key[:8], config["dataset"], f"{config['model']}/{config['width']}",
                     config["attack"], f"{config['poison_ratio']:.0%}", _defense_label(run),
                     str(config["train"]["epochs"]), *cells))
    return columns, rows


def format_table(rows: list[tuple], columns: tuple = COLUMNS, markdown: bool = False) -> str:
    if not rows:
        return "no finished runs in the store"
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) for i, c in enumerate(columns)]
    if markdown:
        lines = ["| " + " | ".join(columns) + " |",
                 "|" + "|".join("---" for _ in columns) + "|"]
        lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
        return "\n".join(lines)
    line = "  ".join(str(c).ljust(w) for c, w in zip(columns, widths))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join([line, rule, *body])
