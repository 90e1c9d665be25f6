"""Hyperparameter sweeps (`--sweep lr=0.05,0.1`): each run of a sweep is the run its own
values train alone, fused or not, chosen on a validation split that every run shares."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from test_fused import TRAJECTORY, losses, members, rel

from fastres import fused, rundir
from fastres.cli import run_main
from fastres.config import RunConfig, build_parser, configs_from_args
from fastres.data import loaders
from fastres.errors import UsageError
from fastres.optim import RunsSGD
from fastres.report import main as report_main
from fastres.rundir import RunDir
from fastres.train import main as train_main
from fastres.train import resume, train, train_group

CPU = torch.device("cpu")
SWEEP_GROUP = pytest.mark.xdist_group("sweep")


def parse(*argv: str) -> list[RunConfig]:
    return configs_from_args(build_parser().parse_args(["resnet20", *argv]))


def test_the_runs_of_a_sweep_are_the_product_named_by_their_values() -> None:
    cfgs = parse("--sweep", "lr=0.05,0.1,0.2", "--sweep", "wd=1e-4,5e-4", "--seeds", "0,1", "--val-split", "5000")
    assert len(cfgs) == 12
    assert cfgs[0].out == "runs/resnet20-A-lr0.05-wd0.0001-seed0"
    assert cfgs[3].out == "runs/resnet20-A-lr0.05-wd0.0005-seed1"
    assert [(c.lr, c.weight_decay, c.seed) for c in cfgs[-2:]] == [(0.2, 5e-4, 0), (0.2, 5e-4, 1)]
    assert len({c.out for c in cfgs}) == 12 and {c.val_seed for c in cfgs} == {0}
    assert cfgs[0].extra == {"sweep": {"lr": [0.05, 0.1, 0.2], "wd": [1e-4, 5e-4]}}
    [a, b] = parse("--sweep", "milestones=100:200,300:400", "--iters", "500", "--out", "mine")
    assert (a.out, a.milestones, b.milestones) == ("mine/resnet20-A-milestones100_200-seed0", (100, 200), (300, 400))
    [c] = parse("--sweep", "warmup_lr=0.01", "--seed", "3")
    assert (c.out, c.warmup_lr, c.seed) == ("runs/resnet20-A-warmup_lr0.01-seed3", 0.01, 3)
    names = [c.out for c in parse("--sweep", "iters=100,200", "--sweep", "momentum=0.8,0.9",
                                  "--sweep", "warmup_iters=0,5")]
    assert names[0] == "runs/resnet20-A-iters100-momentum0.8-warmup_iters0-seed0" and len(names) == 8


@pytest.mark.parametrize(("argv", "words"), [
    (["--sweep", "lr"], "--sweep expects KEY=V1,V2,..., got 'lr'"),
    (["--sweep", "lr="], "--sweep expects KEY=V1,V2"),
    (["--sweep", "batch_size=64,128"], "--sweep batch_size: not sweepable; one of lr, momentum, wd"),
    (["--sweep", "model=resnet32"], "not sweepable"),
    (["--sweep", "lr=0.1,fast"], "--sweep lr: each value must be a number, got 'fast'"),
    (["--sweep", "iters=1.5"], "--sweep iters: each value must be an integer"),
    (["--sweep", "milestones=10,20"], None),  # two schedules of one drop each: valid
    (["--sweep", "milestones=10:x"], "integers joined by ':'"),
    (["--sweep", "lr=0.1,0.10"], "--sweep lr lists a value twice (lr0.1)"),
    (["--sweep", "lr=0.1", "--sweep", "lr=0.2"], "--sweep lr is given twice"),
    (["--sweep", "lr=0.1", "--lr", "0.2"], "--lr and --sweep lr: give one of them"),
    (["--sweep", "wd=0,1e-4", "--wd", "0"], "--wd and --sweep wd: give one of them"),
    (["--sweep", "lr=-0.1,0.1"], "--lr and the warm-up lr must be positive"),
    (["--sweep", "momentum=1.5"], "--momentum must be in [0, 1)"),
    (["--sweep", "lr=0.1", "--seed", "1", "--seeds", "1,2"], "--seed and --seeds"),
    (["--sweep", "lr=0.1,0.2", "--group-size", "0"], "--group-size must be at least 1"),
    (["--group-size", "2"], "give --seeds or --sweep"),
])
def test_a_bad_sweep_is_one_line(argv: list[str], words: str | None) -> None:
    if words is None:
        assert [c.milestones for c in parse(*argv)] == [(10,), (20,)]
        return
    with pytest.raises(UsageError) as e:
        parse(*argv)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_each_run_is_updated_bit_for_bit_as_torch_sgd_with_its_own_values() -> None:
    """Given each run's own gradients, six steps of the sweep's optimiser, across the end of a
    warm-up and a milestone, move each run's weights and momentum bit for bit as
    `torch.optim.SGD` with that run's lr, momentum and weight decay does alone: the same
    code on tensors of the same shapes (`fastres.optim`)."""
    cfgs = [RunConfig("resnet8", "A", lr=0.1, momentum=0.9, weight_decay=1e-4, warmup_iters=2, warmup_lr=0.01,
                      milestones=(4,)),
            RunConfig("resnet8", "A", lr=0.5, momentum=0.0, weight_decay=0.0, milestones=(3, 5)),
            RunConfig("resnet8", "A", lr=0.02, momentum=0.95, weight_decay=5e-4, warmup_iters=3, warmup_lr=0.1)]
    models = members("resnet8", (0, 1, 2), dtype=torch.float32)
    model = fused.fuse(copy.deepcopy(models))
    runs = RunsSGD(model, 3, CPU, None, [(c.momentum, c.weight_decay) for c in cfgs])
    alone = [torch.optim.SGD(m.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
             for m, c in zip(models, cfgs, strict=True)]
    g = torch.Generator().manual_seed(0)
    lrs_seen = set()
    for step in range(6):
        lrs = [c.lr_at(step) for c in cfgs]
        lrs_seen.add(tuple(lrs))
        for m, opt, lr in zip(models, alone, lrs, strict=True):
            opt.param_groups[0]["lr"] = lr
            opt.zero_grad()
            x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
            F.cross_entropy(m(x), y).backward()
            opt.step()
        runs.zero_grad()
        for p, *ps in zip(model.parameters(), *(m.parameters() for m in models), strict=True):
            p.grad = torch.cat([q.grad for q in ps])
        runs.set_lr(lrs)
        runs.step()
    assert len(lrs_seen) == 5  # the warm-ups' ends and the milestones changed the lrs five times
    for k, state in enumerate(fused.split_state(model.state_dict(), 3)):
        for name, v in models[k].named_parameters():
            assert torch.equal(state[name], v), (k, name)
    for k, (opt, saved) in enumerate(zip(alone, runs.state_dicts(), strict=True)):
        assert saved["param_groups"][0]["momentum"] == cfgs[k].momentum
        for p, s in opt.state_dict()["state"].items():
            if s["momentum_buffer"] is None:  # momentum 0 keeps none
                assert saved["state"][p]["momentum_buffer"] is None
            else:
                assert torch.equal(saved["state"][p]["momentum_buffer"], s["momentum_buffer"])


# float64, as tests/test_fused.py's group (its TRAJECTORY bound): 20 steps, every one logged.
FP64 = dict(precision="fp64", iters=20, milestones=(10, 15), batch_size=8, log_every=1, checkpoint_every=10,
            val_split=20, val_seed=3)  # on small_tree: 60 images to train on, 7 steps an epoch
LRS = (0.05, 0.2)  # neither the default 0.1: a run that trained at the default instead would fail


def sweep_configs(tree: Path, folder: Path, **kw) -> list[RunConfig]:
    return [tiny_config(tree, folder / f"lr{lr}", lr=lr, **{**FP64, **kw}) for lr in LRS]


@pytest.fixture(scope="session")
def fp64_sweep(small_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fused sweep of two learning rates on one seed, in float64, with a validation split."""
    folder = tmp_path_factory.mktemp("fp64-sweep")
    train_group(sweep_configs(small_tree, folder))
    return folder


Alone = dict[float, tuple[Path, dict]]  # each lr's run trained alone: its directory and results


@pytest.fixture(scope="session")
def fp64_alone(small_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Alone:
    """Each lr of LRS trained alone (FP64): its directory and results, for the checks that a
    run of a group is the run its values train alone."""
    folder = tmp_path_factory.mktemp("fp64-alone")
    return {lr: (folder / f"lr{lr}", train(tiny_config(small_tree, folder / f"lr{lr}", lr=lr, **FP64))) for lr in LRS}


@SWEEP_GROUP
def test_each_run_of_a_fused_sweep_is_the_run_its_values_train_alone(fp64_sweep: Path, fp64_alone: Alone) -> None:
    """Same seed, other lrs: each run's losses agree with the run trained alone with its lr
    (TRAJECTORY), its val and test errors are the alone run's, and the two runs differ."""
    for lr in LRS:
        run, alone = fp64_alone[lr]
        assert rel(losses(fp64_sweep / f"lr{lr}"), losses(run)) < TRAJECTORY
        result = json.loads((fp64_sweep / f"lr{lr}" / "results.json").read_text())
        assert (result["val_error"], result["test_error"]) == (alone["val_error"], alone["test_error"])
        assert result["config"]["lr"] == lr and result["val_error"] is not None
        records = rundir.MetricsLog(fp64_sweep / f"lr{lr}").read()
        assert {r["lr"] for r in records} == {lr, lr / 10, lr / 100}
    assert rel(losses(fp64_sweep / f"lr{LRS[0]}"), losses(fp64_sweep / f"lr{LRS[1]}")) > 1e-3


def test_every_run_validates_on_the_same_images_whatever_its_seed(tiny_tree: Path) -> None:
    """The held-out images are chosen by --val-seed, not by the run's seed: two seeds of a
    sweep share one split, another --val-seed gives another; a config saved before
    --val-seed existed keeps the split its seed chose."""
    a, b = (loaders.prepare(str(tiny_tree), 40, c.val_seed) for c in parse("--seeds", "0,5", "--val-split", "40"))
    assert np.array_equal(a.splits.val.images, b.splits.val.images)
    other = loaders.prepare(str(tiny_tree), 40, 1)
    assert not np.array_equal(a.splits.val.images, other.splits.val.images)
    old = RunConfig("resnet20", "A", seed=7, val_split=40).to_dict()
    del old["val_seed"]
    assert RunConfig.from_dict(old).val_seed == 7


@SWEEP_GROUP
def test_a_stopped_sweep_resumes_bit_for_bit(small_tree: Path, tmp_path: Path, fp64_sweep: Path) -> None:
    folder = tmp_path / "sweep"
    assert train_group(sweep_configs(small_tree, folder), stop_at=10) is None
    assert json.loads((folder / "lr0.2" / "group.json").read_text())["runs"] == [f"../lr{LRS[0]}", "."]
    results = resume([str(folder / "lr0.2")])
    assert [r["config"]["lr"] for r in results] == list(LRS)
    for lr in LRS:
        assert losses(folder / f"lr{lr}") == losses(fp64_sweep / f"lr{lr}")


@SWEEP_GROUP
def test_a_run_that_ends_first_leaves_the_group_and_the_others_go_on(small_tree: Path, tmp_path: Path,
                                                                    fp64_alone: Alone) -> None:
    """--sweep iters=10,20: the run of 10 writes its results at 10 and leaves; the run of 20
    goes on alone and is the run its values train alone (TRAJECTORY); stopped after 10 and
    resumed from either directory, the group is the one run left."""
    cfgs = [tiny_config(small_tree, tmp_path / f"it{n}", lr=LRS[0], **{**FP64, "iters": n}) for n in (10, 20)]
    short, long = train_group(cfgs)
    assert (short["iters"], long["iters"]) == (10, 20)
    assert [r["iter"] for r in rundir.MetricsLog(tmp_path / "it10").read()][-1] == 10
    run, alone = fp64_alone[LRS[0]]  # the run of 20's values, trained alone
    assert rel(losses(tmp_path / "it20"), losses(run)) < TRAJECTORY
    assert long["test_error"] == alone["test_error"]
    assert RunDir(tmp_path / "it20").group() == [tmp_path / "it20"]  # alone since iteration 10

    stopped = tmp_path / "stopped"
    cfgs = [tiny_config(small_tree, stopped / f"it{n}", lr=LRS[0], **{**FP64, "iters": n}) for n in (10, 20)]
    assert train_group(cfgs, stop_at=15) is None
    assert (stopped / "it10" / "results.json").is_file() and not (stopped / "it20" / "results.json").is_file()
    [result] = resume([str(stopped / "it10")])  # its group.json names both: the finished one is left out
    assert result["iters"] == 20 and losses(stopped / "it20") == losses(tmp_path / "it20")


def test_a_group_that_stops_at_different_iters_must_stop_on_log_points(tiny_tree: Path, tmp_path: Path) -> None:
    cfgs = [tiny_config(tiny_tree, tmp_path / f"it{n}", iters=n) for n in (12, 30)]  # log_every 5
    with pytest.raises(UsageError, match="must stop on a log point, a multiple of --log-every 5: 12 is not"):
        train_group(cfgs)
    assert not any(tmp_path.iterdir())


def test_a_sweep_trains_from_the_command_line(tiny_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["resnet8", "--data", str(tiny_tree), "--sweep", "lr=0.05,0.2", "--iters", "10", "--batch-size", "16",
            "--val-split", "20", "--out", str(tmp_path), "--device", "cpu", "--progress", "plain", "--log-every", "5",
            "--fuse", "on"]
    assert train_main(argv) == 0
    out = capsys.readouterr().out
    assert "2 runs fused (lr0.05 s0, lr0.2 s0)" in out and "iter 10/10  lr0.2 s0" in out
    group = json.loads((tmp_path / "resnet8-A-lr0.05-seed0" / "group.json").read_text())
    assert group == {"runs": [".", "../resnet8-A-lr0.2-seed0"], "sweep": {"lr": [0.05, 0.2]}}
    assert run_main(train_main, ["--resume", str(tmp_path / "resnet8-A-lr0.2-seed0"), "--sweep", "lr=1"]) == 2
    assert "--resume continues the saved config; it cannot change sweep" in capsys.readouterr().err


def write_run(folder: Path, lr: float, seed: int, val: float, test: float) -> None:
    """A finished run's files as training writes them, with the errors a test chooses."""
    cfg = RunConfig("resnet20", "A", lr=lr, seed=seed, val_split=5000, iters=100, milestones=(50, 75),
                    out=str(folder / f"resnet20-A-lr{lr}-seed{seed}"), extra={"sweep": {"lr": [0.02, 0.1, 0.5]}})
    d = RunDir(cfg.out)
    d.path.mkdir(parents=True)
    d.write_config(cfg)
    d.write_results({"model": "resnet20", "shortcut": "A", "dataset": "cifar10", "params": 272_474, "iters": 100,
                     "test_error": test, "val_error": val, "precision": "fp32", "train_time_s": 1.0,
                     "wall_time_s": 1.0, "mean_it_s": 100.0, "device": "cpu", "world_size": 1, "versions": {},
                     "commit": None, "seed": seed, "data": "tiny", "config": cfg.to_dict(), "fused_with": None})


def test_the_report_selects_on_validation_and_states_the_test_error_once(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    """lr 0.1 has the lowest mean val error, lr 0.5 the lowest test error: the report picks
    0.1 and gives its test error, never choosing on test."""
    for seed, (v02, v1, v5) in enumerate([(0.30, 0.20, 0.25), (0.34, 0.22, 0.23)]):
        write_run(tmp_path, 0.02, seed, v02, 0.31)
        write_run(tmp_path, 0.1, seed, v1, 0.21 + seed / 100)
        write_run(tmp_path, 0.5, seed, v5, 0.10)
    assert report_main([str(tmp_path), "--select", "val", "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert "selected on validation error: lr 0.1 (val 21.00 ± 1.41%, n = 2): test error 21.50 ± 0.71%" in out
    assert "never on test" in out
    table = json.loads((tmp_path / "report" / "sweep.json").read_text())
    assert [row["lr"] for row in table["rows"]] == [0.02, 0.1, 0.5] and table["selected"]["lr"] == 0.1
    assert (tmp_path / "report" / "sweep_lr.png").stat().st_size > 0


def test_the_report_refuses_to_select_without_a_validation_split(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    write_run(tmp_path, 0.1, 0, None, 0.2)  # type: ignore[arg-type]
    assert run_main(report_main, [str(tmp_path), "--select", "val"]) == 2
    assert "no validation error" in capsys.readouterr().err


def test_reproduce_sweeps_each_model_and_chooses_on_validation(tiny_tree: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import reproduce

    out = tmp_path / "repro"
    argv = ["--runs", "resnet8", "--scale", "0.0000625", "--data", str(tiny_tree), "--out", str(out),
            "--device", "cpu", "--progress", "none", "--sweep", "lr=0.05,0.2"]  # 4 iterations each
    assert run_main(reproduce.main, argv) == 2
    assert "--sweep needs --val-split N" in capsys.readouterr().err and not out.exists()
    assert reproduce.main([*argv, "--val-split", "20"]) == 0
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["resnet8-A-lr0.05-seed0", "resnet8-A-lr0.2-seed0"]
    table = json.loads((out / "resnet8-A-sweep" / "sweep.json").read_text())
    best = min(table["rows"], key=lambda r: r["val_mean"])
    assert table["selected"] == best and [r["lr"] for r in table["rows"]] == [0.05, 0.2]
    assert "selected on validation error: lr " in capsys.readouterr().out
    assert (out / "report.md").is_file()
