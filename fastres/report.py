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
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fastres import atomic, recipe, rundir
from fastres.cli import Parser, run_main
from fastres.config import comparable
from fastres.errors import RunError
from fastres.models import ModelSpec
from fastres.rundir import RunDir


def reference() -> dict[str, dict[str, float]]:
    """The reference columns (the paper's Table 6, the seed implementation's numbers), from
    `reference.csv`, where each figure has its source."""
    text = (resources.files("fastres") / "reference.csv").read_text()
    table: dict[str, dict[str, float]] = defaultdict(dict)
    for row in csv.DictReader(io.StringIO(text)):
        table[row["column"]][row["run"]] = float(row["test_error_pct"])
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
        return f"{c['iters']} iterations, lr /10 at {', '.join(map(str, c['milestones']))}"

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


def summarize(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per model and set of conditions: mean and std of the final test error over
    seeds. Runs that differ in data, schedule, precision or commit are never averaged; the
    row says what sets it apart from the report's other runs."""
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        groups[(run.spec, run.conditions)].append(run)
    varying = {k for k, _ in runs[0].conditions if len({dict(r.conditions)[k] for r in runs}) > 1}
    ref = reference()
    rows = []
    for spec, conditions in sorted(groups):
        group = groups[(spec, conditions)]
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
            "conditions": ", ".join(f"{k}={json.loads(v)}" for k, v in conditions if k in varying),
        })
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    differ = any(r["conditions"] for r in rows)  # runs under different conditions: say which row is which
    schedules = sorted({s for r in rows for s in r["schedule"]})
    lines = ["# Test error at the final iteration", "",
             f"Schedule used: {'; '.join(schedules)} (the paper: {recipe.ITERS} iterations, "
             f"lr /{recipe.LR_DROP:g} at {', '.join(map(str, recipe.MILESTONES))}).",
             f"Device: {'; '.join(sorted({d for r in rows for d in r['device']}))}.", "",
             "| model | layers | params | seeds | test error % (mean ± std) | paper (Table 6) | seed impl. "
             "| wall time / run |" + (" conditions |" if differ else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---|" if differ else "")]
    for r in rows:
        paper = f"{r['paper']:.2f}" if r["paper"] is not None else "-"
        seed = f"{r['seed_impl']:.1f}" if r["seed_impl"] is not None else "-"
        lines.append(f"| {r['model']} | {r['layers']} | {r['params']:,} | {r['seeds']} | "
                     f"{r['error_mean']:.2f} ± {r['error_std']:.2f} | {paper} | {seed} | {r['wall_time_s']:.0f} s |"
                     + (f" {r['conditions']} |" if differ else ""))
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    cols = ["model", "layers", "params", "seeds", "error_mean", "error_std", "paper", "seed_impl", "wall_time_s",
            "conditions"]
    writer = csv.DictWriter(buf, cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
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


def _curve(run: Run, field: str) -> tuple[list[int], list[float]]:
    pts = [(m["iter"], m[field]) for m in run.metrics if field in m]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(runs: list[Run], out: Path) -> list[Path]:
    """Fig. 6 style: training error bold, test error dashed, one colour per model (first
    seed of each); and training loss. Figures without any of their runs are skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first: dict[ModelSpec, Run] = {}
    for run in runs:
        first.setdefault(run.spec, run)
    written = []
    for name, (title, present) in figure_groups(list(first)).items():
        fig, (ax_err, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
        for i, spec in enumerate(present):
            colour, run = f"C{i}", first[spec]
            it, err = _curve(run, "train_error")
            ax_err.plot(it, [100 * e for e in err], color=colour, linewidth=2, label=f"{spec.tag} train")
            it, err = _curve(run, "test_error")
            ax_err.plot(it, [100 * e for e in err], color=colour, linestyle="--", linewidth=1,
                        label=f"{spec.tag} test")
            it, loss = _curve(run, "train_loss")
            ax_loss.plot(it, loss, color=colour, label=spec.tag)
        ax_err.set(xlabel="iteration", ylabel="error (%)", title=f"{title}: error (bold train, dashed test)")
        ax_loss.set(xlabel="iteration", ylabel="training loss", title=f"{title}: training loss", yscale="log")
        ax_err.legend(fontsize=7)
        ax_loss.legend(fontsize=7)
        fig.tight_layout()
        path = out / name
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        atomic.write_bytes(path, buf.getvalue())
        written.append(path)
    return written


def write_report(run_dirs: list[Path], out: Path) -> None:
    """Find the finished runs, write report.md, report.csv, report.json and the figures
    atomically into `out`, and print the table."""
    runs = find_runs(run_dirs)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"--out {out}: cannot make the report folder there ({e.strerror})") from None
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


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m fastres.report", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories, or folders holding them")
    p.add_argument("--out", type=Path, default=Path("report"))
    args = p.parse_args(argv)
    write_report(args.runs, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
