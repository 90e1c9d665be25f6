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
from pathlib import Path
from typing import Any

from fastres import atomic, checkpoint
from fastres.cli import Parser, run_main
from fastres.errors import RunError
from fastres.models import parse_model_name

# He et al. 2016, Table 6: CIFAR-10 test error (%), option A. Plain nets and option B appear
# only in figures there; ResNet-110 is the best of 5 runs (mean 6.61 +- 0.16).
PAPER_ERROR = {"resnet20-A": 8.75, "resnet32-A": 7.51, "resnet44-A": 7.17, "resnet56-A": 6.97,
               "resnet110-A": 6.43, "resnet1202-A": 7.93}
# The seed implementation this project started from, as its issue reports them (%).
SEED_IMPL_ERROR = {"resnet20-A": 27.9, "resnet56-A": 28.5, "resnet56-B": 25.9, "plain20": 32.5, "plain56": 32.6}


@dataclass
class Run:
    path: Path
    results: dict[str, Any]
    metrics: list[dict[str, Any]]

    @property
    def key(self) -> str:
        r = self.results
        return f"{r['model']}-{r['shortcut']}" if r.get("shortcut") else r["model"]

    @property
    def schedule(self) -> str:
        c = self.results["config"]
        return f"{c['iters']} iterations, lr /10 at {', '.join(map(str, c['milestones']))}"


def find_runs(paths: list[Path]) -> list[Run]:
    """Every finished run at or below the given folders."""
    runs = []
    for root in paths:
        if not root.exists():
            raise RunError(f"{root}: no such folder")
        for res in sorted(root.rglob(checkpoint.RESULTS)):
            runs.append(Run(res.parent, json.loads(res.read_text()), checkpoint.MetricsLog(res.parent).read()))
    if not runs:
        raise RunError(f"no finished runs ({checkpoint.RESULTS}) under {', '.join(map(str, paths))}")
    return runs


def _sort_key(key: str) -> tuple[int, int, str]:
    family, depth = parse_model_name(key.split("-")[0])
    return (0 if family == "plain" else 1, depth, key)


def summarize(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per model and shortcut: mean and std of the final test error over seeds."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        groups[run.key].append(run)
    rows = []
    for key in sorted(groups, key=_sort_key):
        group = groups[key]
        errors = [100 * r.results["test_error"] for r in group]
        r0 = group[0].results
        rows.append({
            "model": key, "layers": parse_model_name(r0["model"])[1], "params": r0["params"],
            "seeds": len(group), "error_mean": statistics.mean(errors),
            "error_std": statistics.stdev(errors) if len(errors) > 1 else 0.0,
            "errors": errors, "paper": PAPER_ERROR.get(key), "seed_impl": SEED_IMPL_ERROR.get(key),
            "wall_time_s": statistics.mean(r.results["wall_time_s"] for r in group),
            "schedule": sorted({r.schedule for r in group}), "device": sorted({r.results["device"] for r in group}),
        })
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    schedules = sorted({s for r in rows for s in r["schedule"]})
    lines = ["# CIFAR-10 test error at the final iteration", "",
             f"Schedule used: {'; '.join(schedules)} (the paper: 64000 iterations, lr /10 at 32000, 48000).",
             f"Device: {'; '.join(sorted({d for r in rows for d in r['device']}))}.", "",
             "| model | layers | params | seeds | test error % (mean ± std) | paper (Table 6) | seed impl. "
             "| wall time / run |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        paper = f"{r['paper']:.2f}" if r["paper"] is not None else "-"
        seed = f"{r['seed_impl']:.1f}" if r["seed_impl"] is not None else "-"
        lines.append(f"| {r['model']} | {r['layers']} | {r['params']:,} | {r['seeds']} | "
                     f"{r['error_mean']:.2f} ± {r['error_std']:.2f} | {paper} | {seed} | {r['wall_time_s']:.0f} s |")
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    cols = ["model", "layers", "params", "seeds", "error_mean", "error_std", "paper", "seed_impl", "wall_time_s"]
    writer = csv.DictWriter(buf, cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def figure_groups(keys: list[str]) -> dict[str, tuple[str, list[str]]]:
    """Which runs go in which figure, as in the paper's Fig. 6: the plain nets, the ResNets,
    the shallowest against the deepest of both, and shortcut options at equal depth."""
    keys = sorted(keys, key=_sort_key)
    plain = [k for k in keys if k.startswith("plain")]
    res_a = [k for k in keys if k.startswith("resnet") and k.endswith("-A")]
    groups = {"plain_nets.png": ("Plain networks", plain), "resnets.png": ("ResNets (option A)", res_a)}
    common = sorted({parse_model_name(k)[1] for k in plain} & {parse_model_name(k.split("-")[0])[1] for k in res_a})
    if len(common) >= 2:
        lo, hi = common[0], common[-1]
        groups[f"depth_{lo}_vs_{hi}.png"] = (f"{lo} vs {hi} layers", [f"plain{lo}", f"plain{hi}",
                                                                      f"resnet{lo}-A", f"resnet{hi}-A"])
    by_depth: dict[str, list[str]] = defaultdict(list)
    for k in keys:
        if k.startswith("resnet"):
            by_depth[k.split("-")[0]].append(k)
    for model, options in by_depth.items():
        if len(options) > 1:
            groups[f"{model}_shortcuts.png"] = (f"{model}: shortcut options", options)
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

    first: dict[str, Run] = {}
    for run in runs:
        first.setdefault(run.key, run)
    written = []
    for name, (title, present) in figure_groups(list(first)).items():
        fig, (ax_err, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
        for i, key in enumerate(present):
            colour = f"C{i}"
            it, err = _curve(first[key], "train_error")
            ax_err.plot(it, [100 * e for e in err], color=colour, linewidth=2, label=f"{key} train")
            it, err = _curve(first[key], "test_error")
            ax_err.plot(it, [100 * e for e in err], color=colour, linestyle="--", linewidth=1, label=f"{key} test")
            it, loss = _curve(first[key], "train_loss")
            ax_loss.plot(it, loss, color=colour, label=key)
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
    out.mkdir(parents=True, exist_ok=True)
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
