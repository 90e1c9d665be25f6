import csv
import json
import sys
from pathlib import Path

import pytest
from conftest import tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import reproduce  # noqa: E402

from fastres import report, rundir  # noqa: E402
from fastres.cli import run_main  # noqa: E402
from fastres.models import ModelSpec  # noqa: E402
from fastres.train import train, train_group  # noqa: E402


def argv(tree: Path, out: Path) -> list[str]:
    # scale 1/16000 of the paper: 4 iterations, lr /10 at 2 and 3 (each step is one at the
    # paper's batch of 128, the CPU cost of these tests: 4 still cross both drops and a resume)
    return ["--runs", "resnet8,plain8", "--seeds", "2", "--scale", "0.0000625", "--data", str(tree), "--out", str(out),
            "--device", "cpu", "--progress", "none"]


def test_reproduce_trains_resumes_skips_and_reports(tiny_tree: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "repro"
    configs = reproduce.run_configs(reproduce.build_parser().parse_args(argv(tiny_tree, out)))
    assert [(c.model, c.seed, c.iters, c.milestones) for c in configs][:2] == [("resnet8", 0, 4, (2, 3)),
                                                                              ("resnet8", 1, 4, (2, 3))]
    assert train(configs[1], stop_at=2) is None  # an interrupted run, to be resumed
    assert reproduce.main(argv(tiny_tree, out)) == 0
    printed, said = capsys.readouterr()
    assert "resuming: " in printed and "iteration 2" in printed
    # plain8's 2 seeds, both new: on a CPU, auto trains them one after another, and says so
    assert "plain8: training the 2 runs one after another (on a CPU" in said
    assert rundir.read_checkpoint(configs[1].out).step == 4
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [(r["model"], r["seeds"]) for r in rows] == [("plain8", "2"), ("resnet8-A", "2")]
    errors = {r["model"]: r for r in json.loads((out / "report.json").read_text())}
    finals = [100 * json.loads((Path(c.out) / "results.json").read_text())["test_error"] for c in configs[:2]]
    assert errors["resnet8-A"]["errors"] == finals
    assert [r["schedule"] for r in rows] == ["4 iterations, lr /10 at 2, 3"] * 2  # on each row
    md = (out / "report.md").read_text()
    assert "| 4 iterations, lr /10 at 2, 3 |" in md and "Schedule used" not in md
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["plain_nets.png", "resnets.png"]
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert reproduce.main(argv(tiny_tree, out)) == 0  # everything done: skipped, report redrawn
    assert capsys.readouterr().out.count("done already") == 4


def test_reproduce_fuses_the_seeds_of_each_model_and_resumes_a_group(tiny_tree: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "repro"
    args = [*argv(tiny_tree, out), "--runs", "resnet8", "--seeds", "3", "--fuse", "on", "--group-size", "2"]
    configs = reproduce.run_configs(reproduce.build_parser().parse_args(args))
    assert train_group(configs[:2], stop_at=2) is None  # an interrupted fused group
    assert reproduce.main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("resuming: ") == 1 and "iteration 2" in printed
    fused_with = [json.loads((Path(c.out) / "results.json").read_text())["fused_with"] for c in configs]
    assert fused_with == [[c.out for c in configs[:2]]] * 2 + [None]  # seeds 0-1 together, seed 2 alone
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [(r["model"], r["seeds"]) for r in rows] == [("resnet8-A", "3")]
    assert reproduce.main([*argv(tiny_tree, out), "--runs", "resnet8", "--seeds", "3"]) == 0
    assert capsys.readouterr().out.count("done already") == 3


def test_report_cli_on_run_dirs(tiny_tree: Path, tmp_path: Path) -> None:
    # any finished run: 2 iterations at tiny_config's batch of 16 (reproduce's runs train at
    # the paper's 128, and the report reads what any run writes)
    train(tiny_config(tiny_tree, tmp_path / "r" / "run", iters=2, eval_every=2))
    assert run_main(report.main, [str(tmp_path / "r"), "--out", str(tmp_path / "rep")]) == 0
    assert "resnet8-A" in (tmp_path / "rep" / "report.md").read_text()
    assert run_main(report.main, [str(tmp_path / "empty-nothing")]) == 2


def test_figure_groups_follow_fig6() -> None:
    specs = [ModelSpec.parse(t) for t in ("resnet20", "resnet56", "resnet56:B", "plain20", "plain32", "plain56")]
    groups = {name: [s.tag for s in members] for name, (_, members) in report.figure_groups(specs).items()}
    assert groups["plain_nets.png"] == ["plain20", "plain32", "plain56"]
    assert groups["depth_20_vs_56.png"] == ["plain20", "plain56", "resnet20-A", "resnet56-A"]
    assert groups["resnet56_shortcuts.png"] == ["resnet56-A", "resnet56-B"]


def fake_run(error: float, metrics: list[dict] | None = None, **changes) -> report.Run:
    config = {"iters": 64000, "milestones": [32000, 48000], "lr": 0.1, "warmup_iters": 0, "warmup_lr": 0.01,
              "batch_size": 128, "momentum": 0.9, "weight_decay": 1e-4, "normalize": "pixel", "val_split": 0}
    results = {"model": "resnet20", "shortcut": "A", "params": 269_722, "test_error": error, "wall_time_s": 1.0,
               "device": "cpu", "data": "images: d", "precision": "bf16", "commit": "abc", "config": config}
    for k, v in changes.items():
        (config if k in config else results)[k] = v
    return report.Run(results, metrics or [])


def logged(iters: list[int], train_error: float, test_every: int) -> list[dict]:
    """A metrics log: the training error and loss at each of `iters`, the test error at
    multiples of `test_every` and at the last."""
    return [{"iter": i, "train_error": train_error, "train_loss": 10 * train_error,
             **({"test_error": train_error + 0.05} if i % test_every == 0 or i == iters[-1] else {})} for i in iters]


def test_report_averages_only_comparable_runs() -> None:
    rows = report.summarize([fake_run(0.10), fake_run(0.12), fake_run(0.30, precision="fp32"),
                             fake_run(0.20, iters=32000)])
    assert [(r["seeds"], round(r["error_mean"], 6)) for r in rows] == [(1, 20.0), (2, 11.0), (1, 30.0)]
    assert [r["conditions"] for r in rows] == ["iters=32000, precision=bf16", "iters=64000, precision=bf16",
                                               "iters=64000, precision=fp32"]
    assert "| conditions |" in report.markdown(rows)
    same = report.summarize([fake_run(0.10), fake_run(0.12)])
    assert len(same) == 1 and same[0]["conditions"] == "" and "conditions" not in report.markdown(same)


def test_reference_figures_come_from_the_table_with_sources() -> None:
    ref = report.reference()
    assert ref["paper"]["resnet110-A"] == 6.43 and ref["seed_impl"]["resnet56-B"] == 25.9


def test_one_seed_is_n_1_and_several_are_mean_and_std() -> None:
    md = report.markdown(report.summarize([fake_run(0.10), fake_run(0.30, precision="fp32"),
                                           fake_run(0.32, precision="fp32")]))
    assert "| 10.00 (n = 1) |" in md and "± 0.00" not in md
    assert "| 31.00 ± 1.41 |" in md


def test_each_row_names_its_schedule_and_the_columns_are_explained() -> None:
    rows = report.summarize([fake_run(0.10), fake_run(0.20, iters=32000, milestones=[16000, 24000])])
    md = report.markdown(rows)
    assert "| 32000 iterations, lr /10 at 16000, 24000 |" in md and "| 64000 iterations, lr /10 at 32000, 48000 |" in md
    assert "Schedule used" not in md
    notes = md.split("Columns:")[1]
    assert "**seed impl.**: the test error of the implementation fastres started from" in notes
    assert "**paper (Table 6)**: He et al. 2016, Table 6" in notes and "`n = 1`" in notes
    assert "**conditions**" in notes and "**schedule**" in notes
    table = list(csv.DictReader(report.csv_text(rows).splitlines()))
    assert list(table[0])[:10] == ["model", "layers", "params", "seeds", "error_mean", "error_std", "paper",
                                   "seed_impl", "wall_time_s", "conditions"]  # the columns earlier reports had
    assert [r["schedule"] for r in table] == ["32000 iterations, lr /10 at 16000, 24000",
                                              "64000 iterations, lr /10 at 32000, 48000"]


def family_runs() -> list[report.Run]:
    """Seven resnet20 runs as a table has them (three seeds, and four runs of other schedules,
    one a 3-iteration run with a single test point), a resnet56 and two plain20 seeds."""
    long = list(range(100, 1001, 100))
    runs = [fake_run(0.1, logged(long, e, 500)) for e in (0.1, 0.2, 0.3)]
    runs += [fake_run(0.2, logged([1, 2, 3], 0.5, 1000), iters=3, milestones=[])]
    runs += [fake_run(0.2, logged(long, e, 500), iters=1000, milestones=[500]) for e in (0.4, 0.45, 0.5)]
    runs += [fake_run(0.1, logged(long, 0.15, 500), model="resnet56", params=853_018)]
    runs += [fake_run(0.3, logged(long, e, 500), model="plain20", shortcut=None) for e in (0.25, 0.35)]
    return runs


def test_one_figure_per_family_holds_every_comparable_run_as_a_mean_and_a_band(tmp_path: Path) -> None:
    figures = report.figures(family_runs())
    assert sorted(figures) == ["plain_nets.png", "resnets.png"]
    title, lines = figures["resnets.png"]
    assert [line.label for line in lines] == [
        "resnet20-A [iters=1000, milestones=[500]] (n = 3)", "resnet20-A [iters=3, milestones=[]] (n = 1)",
        "resnet20-A [iters=64000, milestones=[32000, 48000]] (n = 3)",
        "resnet56-A [iters=64000, milestones=[32000, 48000]] (n = 1)"]
    assert [line.label for line in figures["plain_nets.png"][1]] == ["plain20 (n = 2)"]  # nothing varies in it
    three = lines[2].curves["train_error"]
    assert three.iters == list(range(100, 1001, 100)) and three.mean[0] == pytest.approx(20.0)
    assert (three.low[0], three.high[0]) == pytest.approx((10.0, 30.0))  # the seeds' spread
    assert lines[1].curves["test_error"].iters == [3]  # a single test point
    assert [r.name for r in report.plot(family_runs(), tmp_path)] == list(figures)  # one file a family
    fig = report.draw(title, lines)
    ax_err = fig.axes[0]
    single = next(line for line in ax_err.lines if line.get_label() == f"{lines[1].label} test")
    assert single.get_marker() == "o" and list(single.get_xdata()) == [3]  # visible, as a marker
    assert len(ax_err.collections) == 4  # bands: train and test error of the two rows of 3 seeds
    report._png(fig)  # closes it



@pytest.mark.parametrize("bad", [["--runs", "resnet21"], ["--runs", "resnet20:D"], ["--scale", "2"], ["--seeds", "0"]])
def test_reproduce_bad_input_is_one_line(bad: list[str], capsys: pytest.CaptureFixture) -> None:
    assert run_main(reproduce.main, bad) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastres: error: ") and err.count("\n") == 1
