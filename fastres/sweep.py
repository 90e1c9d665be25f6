"""A sweep's report: `python -m fastres.report RUNS --select val`.

The runs of a sweep (`--sweep lr=0.05,0.1,0.2`) are grouped by their swept values, each
setting's seeds averaged. The setting is chosen on the validation error (`--val-split`)
alone, and its test error is stated once, as the paper fixed its schedule on a 45k/5k
split: choosing on the test error would report a figure chosen to be low.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from fastres.config import SWEEPS, comparable
from fastres.errors import RunError

SWEEP_FILES = ("sweep.md", "sweep.json")
LOG_AXIS = ("lr", "wd", "warmup_lr")  # values spread over decades


def _value(results: dict[str, Any], key: str) -> Any:
    v = results["config"][SWEEPS[key].field]
    return tuple(v) if isinstance(v, list) else v


def _shown(key: str, value: Any) -> str:
    return ":".join(map(str, value)) if isinstance(value, tuple) else f"{value:g}"


def swept_keys(results: list[dict[str, Any]]) -> list[str]:
    """The sweep's keys: as its runs recorded them (`extra["sweep"]`), else the
    hyperparameters that vary among the runs."""
    recorded = [k for r in results for k in r["config"].get("extra", {}).get("sweep", {})]
    keys = list(dict.fromkeys(recorded)) or [k for k in SWEEPS if len({_value(r, k) for r in results}) > 1]
    if not keys:
        raise RunError("--select val compares the runs of a sweep: these runs do not differ in any hyperparameter "
                       f"({', '.join(SWEEPS)})")
    return keys


def _check_one_sweep(results: list[dict[str, Any]], keys: list[str]) -> None:
    """Only the swept values and the seed may differ (another model, data or split is
    another experiment, never averaged or compared here)."""
    free = {SWEEPS[k].field for k in keys}
    for name in ["model", "shortcut", *comparable()]:
        if name not in free and len({json.dumps(r["config"].get(name)) for r in results}) > 1:
            raise RunError(f"--select val compares the runs of one sweep: these also differ in {name}; "
                           "report each sweep's folder on its own")
    missing = [r["config"]["out"] for r in results if r.get("val_error") is None]
    if missing:
        raise RunError(f"{missing[0]} has no validation error (train with --val-split N): a sweep is chosen on "
                       "validation, never on test")


@dataclass
class Setting:
    """One point of the sweep, its seeds' final val and test errors (in %)."""

    values: dict[str, Any]
    val: list[float]
    test: list[float]

    def row(self) -> dict[str, Any]:
        return {**{k: list(v) if isinstance(v, tuple) else v for k, v in self.values.items()},
                "seeds": len(self.val), "val_mean": statistics.mean(self.val), "val_std": _std(self.val),
                "test_mean": statistics.mean(self.test), "test_std": _std(self.test),
                "val_errors": self.val, "test_errors": self.test}


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def settings(results: list[dict[str, Any]]) -> tuple[list[str], list[Setting]]:
    """The sweep's keys and its settings, in the order of their values."""
    keys = swept_keys(results)
    _check_one_sweep(results, keys)
    grouped: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        grouped[tuple(_value(r, k) for k in keys)].append(r)
    return keys, [Setting(dict(zip(keys, values, strict=True)), [100 * r["val_error"] for r in runs],
                          [100 * r["test_error"] for r in runs]) for values, runs in sorted(grouped.items())]


def _cell(mean: float, std: float, n: int) -> str:
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f} (n = 1)"


def markdown(keys: list[str], rows: list[Setting], best: Setting, model: str) -> str:
    """The sweep's table, then the one choice it makes, on validation."""
    lines = [f"# Sweep of {model}: final errors, chosen on validation", "",
             "| " + " | ".join(keys) + " | seeds | val error % | test error % |",
             "|" + "---:|" * (len(keys) + 3)]
    for s in rows:
        r = s.row()
        mark = " **selected**" if s is best else ""
        lines.append("| " + " | ".join(_shown(k, s.values[k]) for k in keys) + f" | {r['seeds']} | "
                     f"{_cell(r['val_mean'], r['val_std'], r['seeds'])}{mark} | "
                     f"{_cell(r['test_mean'], r['test_std'], r['seeds'])} |")
    return "\n".join(lines + ["", selection_line(keys, best), "",
                              "The setting is chosen by its mean validation error over its seeds, never on test: "
                              "the test column is reported, not compared. Errors are at the final iteration, "
                              "mean ± std over seeds."]) + "\n"


def selection_line(keys: list[str], best: Setting) -> str:
    r = best.row()
    values = ", ".join(f"{k} {_shown(k, best.values[k])}" for k in keys)
    spread = (f"{r['val_mean']:.2f} ± {r['val_std']:.2f}%, n = {r['seeds']}" if r["seeds"] > 1
              else f"{r['val_mean']:.2f}%, n = 1")
    test = f"{r['test_mean']:.2f} ± {r['test_std']:.2f}%" if r["seeds"] > 1 else f"{r['test_mean']:.2f}%"
    return f"selected on validation error: {values} (val {spread}): test error {test}"


def draw(key: str, keys: list[str], rows: list[Setting]) -> Any:
    """Val error against one swept value: a line for each setting of the other keys, each
    point its seeds' mean with their spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [k for k in keys if k != key]
    lines: dict[tuple[Any, ...], list[Setting]] = defaultdict(list)
    for s in rows:
        lines[tuple(s.values[k] for k in others)].append(s)
    categorical = SWEEPS[key].kind is tuple  # milestones: one tick per schedule
    ticks = sorted({s.values[key] for s in rows})
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (other, points) in enumerate(sorted(lines.items())):
        xs = [ticks.index(p.values[key]) if categorical else p.values[key] for p in points]
        ys = [statistics.mean(p.val) for p in points]
        err = [[y - min(p.val) for y, p in zip(ys, points, strict=True)],
               [max(p.val) - y for y, p in zip(ys, points, strict=True)]]
        label = ", ".join(f"{k} {_shown(k, v)}" for k, v in zip(others, other, strict=True)) or None
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=f"C{i}", label=label)
    if categorical:
        ax.set_xticks(range(len(ticks)), [_shown(key, t) for t in ticks])
    elif key in LOG_AXIS:
        ax.set_xscale("log")
    ax.set(xlabel=key, ylabel="final val error (%)", title=f"val error against {key} (mean, seeds' range)")
    if others:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def build(results: list[dict[str, Any]]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The sweep's table (markdown, ending with its one choice), the same as JSON, and a
    plot (a matplotlib figure) per swept key, by file name."""
    keys, rows = settings(results)
    best = min(rows, key=lambda s: statistics.mean(s.val))
    table = markdown(keys, rows, best, results[0]["model"])
    summary = {"keys": keys, "selected_on": "val_error", "rows": [s.row() for s in rows], "selected": best.row()}
    return table, summary, {f"sweep_{key}.png": draw(key, keys, rows) for key in keys}
