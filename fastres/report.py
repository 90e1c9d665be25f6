"""Tables and figures from finished runs: `python -m fastres.report RUN_DIR... --out DIR`.

Works on any run directories (each holding `results.json` and `metrics.jsonl`), so a
user can redraw the report from runs made elsewhere. Errors are final-iteration test
errors, as mean +- std over seeds, next to the paper's Table 6.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastres import atomic, recipe, rundir, schedule, sweep
from fastres.cli import Parser, run_main
from fastres.config import comparable
from fastres.errors import RunError
from fastres.models import ModelSpec
from fastres.rundir import RunDir


def _reference_rows() -> list[dict[str, str]]:
    # Beside this module, not `resources.files("fastres")`: run from the folder that holds an
    # editable checkout named fastres, `import fastres` finds that folder first as a namespace
    # package, whose files are not the package's.
    text = Path(__file__).with_name("reference.csv").read_text()
    return list(csv.DictReader(io.StringIO(text)))


def reference() -> dict[str, dict[str, float]]:
    """The reference columns (the paper's Table 6, the seed implementation's numbers), from
    `reference.csv`, where each figure has its source."""
    table: dict[str, dict[str, float]] = defaultdict(dict)
    for row in _reference_rows():
        table[row["column"]][row["run"]] = float(row["test_error_pct"])
    return table


def reference_sources() -> dict[str, dict[str, str]]:
    """Where each reference figure comes from, by column and run (`reference.csv`'s sources)."""
    table: dict[str, dict[str, str]] = defaultdict(dict)
    for row in _reference_rows():
        table[row["column"]][row["run"]] = row["source"]
    return table


@dataclass
class Run:
    results: dict[str, Any]
    metrics: list[dict[str, Any]]

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.parse(self.results["model"], self.results.get("shortcut"))

    @property
    def schedule(self) -> str:
        c = self.results["config"]
        return schedule.describe(c["iters"], c["milestones"])

    @property
    def conditions(self) -> tuple[tuple[str, str], ...]:
        """What besides the model decides its result: data, schedule and optimiser, precision, code."""
        r, c = self.results, self.results["config"]
        values = {k: c.get(k) for k in comparable()}
        values.update(data=r.get("data"), dataset=c.get("dataset", "cifar10"),
                      precision=r.get("precision") or r.get("amp_dtype") or "fp32",
                      commit=(r.get("commit") or "unknown")[:10])
        return tuple(sorted((k, json.dumps(v)) for k, v in values.items()))


def find_runs(paths: list[Path]) -> list[Run]:
    """Every finished run at or below the given folders."""
    runs = []
    for root in paths:
        if not root.exists():
            raise RunError(f"{root}: no such folder")
        for res in sorted(root.rglob(rundir.RESULTS)):
            d = RunDir(res.parent)
            results = d.results()
            assert results is not None  # the file was just found
            runs.append(Run(results, d.metrics.read()))
    if not runs:
        raise RunError(f"no finished runs ({rundir.RESULTS}) under {', '.join(map(str, paths))}")
    return runs


Conditions = tuple[tuple[str, str], ...]


def _groups(runs: list[Run]) -> dict[tuple[ModelSpec, Conditions], list[Run]]:
    """The runs a table row averages: one model under one set of conditions."""
    groups: dict[tuple[ModelSpec, Conditions], list[Run]] = defaultdict(list)
    for run in runs:
        groups[(run.spec, run.conditions)].append(run)
    return dict(sorted(groups.items()))


def _what_differs(runs: list[Run]) -> Callable[[Conditions], str]:
    """How a row names its conditions: only those that vary over the report's runs."""
    varying = {k for k, _ in runs[0].conditions if len({dict(r.conditions)[k] for r in runs}) > 1}
    return lambda conditions: ", ".join(f"{k}={json.loads(v)}" for k, v in conditions if k in varying)


def summarize(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per model and set of conditions: mean and std of the final test error over
    seeds. Runs that differ in data, schedule, precision or commit are never averaged; the
    row says what sets it apart from the report's other runs. One seed's std is 0.0 in the
    rows (readers of report.csv and report.json expect a number), `n = 1` in the table."""
    differs = _what_differs(runs)
    ref = reference()
    rows = []
    for (spec, conditions), group in _groups(runs).items():
        errors = [100 * r.results["test_error"] for r in group]
        dataset = group[0].results["config"].get("dataset", "cifar10")
        cifar10 = dataset == "cifar10"  # the reference columns are CIFAR-10's
        rows.append({
            "model": spec.tag, "dataset": dataset, "layers": spec.depth, "params": group[0].results["params"],
            "seeds": len(group), "error_mean": statistics.mean(errors),
            "error_std": statistics.stdev(errors) if len(errors) > 1 else 0.0,
            "errors": errors, "paper": ref["paper"].get(spec.tag) if cifar10 else None,
            "seed_impl": ref["seed_impl"].get(spec.tag) if cifar10 else None,
            "wall_time_s": statistics.mean(r.results["wall_time_s"] for r in group),
            "schedule": sorted({r.schedule for r in group}), "device": sorted({r.results["device"] for r in group}),
            "conditions": differs(conditions),
        })
    return rows


def _error_cell(r: dict[str, Any]) -> str:
    spread = f"± {r['error_std']:.2f}" if r["seeds"] > 1 else "(n = 1)"
    return f"{r['error_mean']:.2f} {spread}"


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table, a row per model and conditions with its schedule, then what its columns are."""
    differ = any(r["conditions"] for r in rows)  # runs under different conditions: say which row is which
    lines = ["# Test error at the final iteration", "",
             f"Device: {'; '.join(sorted({d for r in rows for d in r['device']}))}.", "",
             "| model | layers | params | seeds | test error % (mean ± std) | paper (Table 6) | seed impl. "
             "| schedule | wall time / run |" + (" conditions |" if differ else ""),
             "|---|---:|---:|---:|---:|---:|---:|---|---:|" + ("---|" if differ else "")]
    for r in rows:
        paper = f"{r['paper']:.2f}" if r["paper"] is not None else "-"
        seed = f"{r['seed_impl']:.1f}" if r["seed_impl"] is not None else "-"
        lines.append(f"| {r['model']} | {r['layers']} | {r['params']:,} | {r['seeds']} | {_error_cell(r)} | "
                     f"{paper} | {seed} | {'; '.join(r['schedule'])} | {r['wall_time_s']:.0f} s |"
                     + (f" {r['conditions']} |" if differ else ""))
    return "\n".join(lines + ["", *column_notes(differ)]) + "\n"


def column_notes(conditions: bool) -> list[str]:
    """What the table's columns are, under it; the reference columns' sources are
    `reference.csv`'s."""
    sources = reference_sources()
    notes = ["Columns:",
             "- **test error %**: at the final iteration, the mean ± std over the row's seeds; `n = 1`: one seed, "
             "so no spread.",
             f"- **paper (Table 6)**: {_source_note(sources['paper'])}.",
             f"- **seed impl.**: the test error of {_source_note(sources['seed_impl'])}; for comparison only, "
             "not a target.",
             f"- **schedule**: the row's iterations and learning-rate drops (the paper's: "
             f"{schedule.describe(recipe.ITERS, recipe.MILESTONES, recipe.LR_DROP)}).",
             "- **wall time / run**: the mean over the row's runs, evaluations and checkpoints included."]
    if conditions:
        notes.append("- **conditions**: what sets the row's runs apart from the report's others; runs that differ in "
                     "them are never averaged.")
    return notes


def _source_note(sources: dict[str, str]) -> str:
    """A reference column's sources in one line: the first row's, then each row's own note."""
    first = next(iter(sources.values()))
    own = [f"{run}: {source.split(': ', 1)[1]}" for run, source in sources.items() if ": " in source]
    return "; ".join([first, *own])


def csv_text(rows: list[dict[str, Any]]) -> str:
    """The table as CSV; the schedule column comes last, after the columns earlier reports had."""
    buf = io.StringIO()
    cols = ["model", "layers", "params", "seeds", "error_mean", "error_std", "paper", "seed_impl", "wall_time_s",
            "conditions", "schedule"]
    writer = csv.DictWriter(buf, cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({**r, "schedule": "; ".join(r["schedule"])} for r in rows)
    return buf.getvalue()


def figure_groups(specs: list[ModelSpec]) -> dict[str, tuple[str, list[ModelSpec]]]:
    """Which runs go in which figure, as in the paper's Fig. 6: the plain nets, the ResNets,
    the shallowest against the deepest of both, and shortcut options at equal depth."""
    specs = sorted(set(specs))
    plain = [s for s in specs if s.family == "plain"]
    res_a = [s for s in specs if s.family == "resnet" and s.shortcut == "A"]
    groups = {"plain_nets.png": ("Plain networks", plain), "resnets.png": ("ResNets (option A)", res_a)}
    common = sorted({s.depth for s in plain} & {s.depth for s in res_a})
    if len(common) >= 2:
        lo, hi = common[0], common[-1]
        groups[f"depth_{lo}_vs_{hi}.png"] = (f"{lo} vs {hi} layers", [
            ModelSpec("plain", lo, None), ModelSpec("plain", hi, None),
            ModelSpec("resnet", lo, "A"), ModelSpec("resnet", hi, "A")])
    by_depth: dict[int, list[ModelSpec]] = defaultdict(list)
    for s in specs:
        if s.family == "resnet":
            by_depth[s.depth].append(s)
    for depth, options in by_depth.items():
        if len(options) > 1:
            groups[f"resnet{depth}_shortcuts.png"] = (f"resnet{depth}: shortcut options", options)
    return {name: group for name, group in groups.items() if group[1]}


MARKED = 20  # a curve of at most this many points gets a marker at each, so a single point shows
FIELDS = ("train_error", "test_error", "train_loss")


@dataclass
class Curve:
    """One metric of one table row: the mean over the row's seeds at the iterations every
    seed logged, and the seeds' spread (lowest, highest) there."""

    iters: list[int]
    mean: list[float]
    low: list[float]
    high: list[float]


@dataclass
class Line:
    """One table row in a figure: its label and a curve of each of `FIELDS`."""

    label: str
    seeds: int
    curves: dict[str, Curve]


def curve(group: list[Run], field: str) -> Curve:
    """The row's curve of `field` (errors in %)."""
    scale = 100 if field.endswith("error") else 1
    logged = [{m["iter"]: scale * m[field] for m in run.metrics if field in m} for run in group]
    iters = sorted(set.intersection(*(set(points) for points in logged)))
    values = [[points[i] for points in logged] for i in iters]
    return Curve(iters, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values])


def figures(runs: list[Run]) -> dict[str, tuple[str, list[Line]]]:
    """What each figure shows (its file name, title and lines): one figure per family of
    `figure_groups`, and in it every table row of its models, each row's seeds averaged. A
    label names the conditions that vary among the figure's runs."""
    groups = _groups(runs)
    shown = {}
    for name, (title, specs) in figure_groups([spec for spec, _ in groups]).items():
        rows = [(spec, conditions) for spec in specs for (s, conditions) in groups if s == spec]
        differs = _what_differs([run for row in rows for run in groups[row]])
        lines = []
        for spec, conditions in rows:
            group, differ = groups[(spec, conditions)], differs(conditions)
            label = f"{spec.tag}{f' [{differ}]' if differ else ''} (n = {len(group)})"
            lines.append(Line(label, len(group), {field: curve(group, field) for field in FIELDS}))
        shown[name] = (title, lines)
    return shown


def _draw_curve(ax: Any, c: Curve, colour: str, label: str, **style: Any) -> None:
    """The mean as a line (with markers when it has few points), the seeds' spread as a band."""
    ax.plot(c.iters, c.mean, color=colour, label=label, marker="o" if len(c.iters) <= MARKED else None,
            markersize=3, **style)
    if c.low != c.high:
        ax.fill_between(c.iters, c.low, c.high, color=colour, alpha=0.2, linewidth=0)


def draw(title: str, lines: list[Line]) -> Any:
    """A figure in Fig. 6's style: error (training bold, test dashed) and training loss, one
    colour per table row, named in one legend under both plots (it grows with the rows, and
    never covers a curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    legend_in = 0.2 * ((len(lines) + 1) // 2) + 0.1  # inches: two rows' labels a legend line
    fig, (ax_err, ax_loss) = plt.subplots(1, 2, figsize=(11, 4 + legend_in))
    for i, line in enumerate(lines):
        c = line.curves
        _draw_curve(ax_err, c["train_error"], f"C{i}", f"{line.label} train", linewidth=2)
        _draw_curve(ax_err, c["test_error"], f"C{i}", f"{line.label} test", linewidth=1, linestyle="--")
        _draw_curve(ax_loss, c["train_loss"], f"C{i}", line.label, linewidth=1)
    ax_err.set(xlabel="iteration", ylabel="error (%)", title=f"{title}: error (bold train, dashed test)")
    ax_loss.set(xlabel="iteration", ylabel="training loss", title=f"{title}: training loss", yscale="log")
    fig.legend(*ax_loss.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, legend_in / (4 + legend_in), 1, 1))
    return fig


def plot(runs: list[Run], out: Path) -> list[Path]:
    """One PNG per figure of `figures`: every comparable run's seeds as a mean and a band.
    Figures without any of their runs are skipped."""
    written = []
    for name, (title, lines) in figures(runs).items():
        atomic.write_bytes(out / name, _png(draw(title, lines)))
        written.append(out / name)
    return written


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt  # after `draw` chose the Agg backend

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


REPORT_FILES = ("report.md", "report.csv", "report.json")


def refuse_foreign(out: Path, files: tuple[str, ...] = REPORT_FILES) -> None:
    """A report replaces only an earlier report (all of its files), never a run
    directory's files or a user's own report.md; then its folder is made."""
    if any((out / name).exists() for name in rundir.OWN):
        raise RunError(f"--out {out} is a run directory: write the report into another folder")
    present = [name for name in files if (out / name).exists()]
    if present and len(present) < len(files):
        raise RunError(f"--out {out} holds {', '.join(present)}, not a report fastres wrote (it writes "
                       f"{', '.join(files)} together): choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"--out {out}: cannot make the report folder there ({e.strerror})") from None


def write_report(run_dirs: list[Path], out: Path) -> None:
    """Find the finished runs, write report.md, report.csv, report.json and the figures
    atomically into `out`, and print the table."""
    runs = find_runs(run_dirs)
    refuse_foreign(out)
    rows = summarize(runs)
    table = markdown(rows)
    figures = plot(runs, out)
    md = table + "\n" + "".join(f"![{p.stem}]({p.name})\n" for p in figures)
    atomic.write_bytes(out / "report.md", md.encode())
    atomic.write_bytes(out / "report.csv", csv_text(rows).encode())
    atomic.write_json(out / "report.json", rows)
    written = [out / "report.md", out / "report.csv", out / "report.json", *figures]
    print(table)
    print("written: " + ", ".join(map(str, written)))


def write_sweep(run_dirs: list[Path], out: Path) -> None:
    """The runs are a sweep's: write sweep.md, sweep.json and a plot per swept value into
    `out` atomically, and print the table and its choice (`fastres.sweep`)."""
    results = [run.results for run in find_runs(run_dirs)]
    refuse_foreign(out, sweep.SWEEP_FILES)
    table, summary, plots = sweep.build(results)
    for name, fig in plots.items():
        atomic.write_bytes(out / name, _png(fig))
    md = table + "\n" + "".join(f"![{Path(name).stem}]({name})\n" for name in plots)
    atomic.write_bytes(out / "sweep.md", md.encode())
    atomic.write_json(out / "sweep.json", summary)
    print(table)
    print("written: " + ", ".join(str(out / name) for name in [*sweep.SWEEP_FILES, *plots]))


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m fastres.report", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories, or folders holding them")
    p.add_argument("--out", type=Path, default=Path("report"))
    p.add_argument("--select", choices=("val",), help="the runs are a sweep (--sweep): tabulate its settings and "
                   "choose one on the validation error alone (sweep.md, sweep.json, a plot per swept value)")
    args = p.parse_args(argv)
    if args.select:
        write_sweep(args.runs, args.out)
    else:
        write_report(args.runs, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
