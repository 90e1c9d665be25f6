"""Fused runs: N models as one step, each run exactly the run its seed trains alone."""

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import deterministic, tiny_config

from fastres import fused, group, rundir
from fastres import train as train_module
from fastres.cli import run_main
from fastres.config import RunConfig, build_parser, configs_from_args
from fastres.data.dataset import Split
from fastres.data.torch_loader import TorchLoader
from fastres.errors import UsageError
from fastres.evaluate import main as evaluate_main
from fastres.models import ModelSpec
from fastres.rundir import RunDir
from fastres.step import TrainStep
from fastres.train import main as train_main
from fastres.train import train, train_group

CPU = torch.device("cpu")

# The tests sharing a reference run stay on one pytest-xdist worker, so it is trained once:
# one group for the float64 references, one for the fp32 ones.
FP64_GROUP, FP32_GROUP = pytest.mark.xdist_group("fused-fp64"), pytest.mark.xdist_group("fused-fp32")


def members(spec: str, seeds: tuple[int, ...], num_classes: int = 10,
            dtype: torch.dtype = torch.float64) -> list[torch.nn.Module]:
    """Each seed's model as it is built alone, in float64 by default (see EXACT)."""
    built = []
    for seed in seeds:
        torch.manual_seed(seed)
        built.append(ModelSpec.parse(spec).build(num_classes).to(dtype))
    return built


# Fused and single models compute the same sums in another order (a grouped convolution,
# a batched matmul), so they may differ by rounding (here, in float64, the forward happens
# to agree exactly). The checks below run in float64, where rounding is u = 2**-53 = 1.1e-16:
# - one forward or step: the longest sums are BN's batch statistics, 8*32*32 = 8192 terms;
#   a change of summation order moves a sum of n terms by at most n*u*sum(|terms|), 9e-13 of
#   the terms' magnitude, and 7 conv+BN layers (each renormalised by its BN, gains of order
#   1 to 10) compound that to 7 * 10 * 9e-13 = 6e-11 at most: EXACT leaves 16 times more;
# - training: each step amplifies the rounding, a factor measured, not derived. In fp32 (u =
#   6e-8), 30 steps of fused against alone drifted by 3.5e-3 (AVX-512) and 0.11 (oneDNN
#   capped at AVX2): amplification 6e4 to 2e6. The same amplification on float64's rounding
#   gives 2e6 * 1.1e-16 = 2e-10 (measured: 3e-15 and 5e-15 over 30 steps; the runs here take
#   20); TRAJECTORY leaves five times that, and is still 1e7 times below a real error (a
#   wrong batch, a wrong slice, another run's gradient change the loss at 1e-2 or more).
EXACT = 1e-9
TRAJECTORY = 1e-9


def rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) > 0
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("spec", ["resnet8", "resnet8:B", "resnet8:C", "plain8"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_fused_forward_is_the_members_forwards(spec: str, channels_last: bool) -> None:
    models = members(spec, (0, 1, 2))
    model = fused.fuse(copy.deepcopy(models))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    xs = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
          for k in range(3)]
    out = model(torch.cat(xs, 1).contiguous(memory_format=fmt)).unflatten(1, (3, 10))
    for k, (m, x) in enumerate(zip(models, xs, strict=True)):
        torch.testing.assert_close(out[:, k], m(x), rtol=EXACT, atol=EXACT)
    # BN statistics are per model: each run's running mean is its own batch's
    for name, buf in model.state_dict().items():
        if name.endswith("running_mean"):
            for k, m in enumerate(models):
                torch.testing.assert_close(buf.chunk(3)[k], m.state_dict()[name], rtol=EXACT, atol=EXACT)


def test_a_run_never_sees_another_runs_input() -> None:
    """Option A pads each run's channels, never across runs: changing run 1's images leaves
    run 0's and run 2's outputs bit for bit as they were."""
    model = fused.fuse(members("resnet8", (0, 1, 2), dtype=torch.float32)).eval()
    x = torch.randn(4, 9, 32, 32)
    y = x.clone()
    y[:, 3:6] = torch.randn(4, 3, 32, 32) * 100
    a, b = model(x).unflatten(1, (3, 10)), model(y).unflatten(1, (3, 10))
    assert torch.equal(a[:, 0], b[:, 0]) and torch.equal(a[:, 2], b[:, 2]) and not torch.equal(a[:, 1], b[:, 1])


def test_a_fused_state_is_the_members_states_in_the_single_format() -> None:
    models = members("resnet8:B", (3, 4), num_classes=100, dtype=torch.float32)
    model = fused.fuse(models)
    split = fused.split_state(model.state_dict(), 2)
    for k, m in enumerate(models):
        single = m.state_dict()
        assert split[k].keys() == single.keys()
        assert all(torch.equal(split[k][n], v) for n, v in single.items())  # each run starts from its seed's init
    joined = fused.join_states(split)
    assert all(torch.equal(joined[n], v) for n, v in model.state_dict().items())
    assert fused.fuse(models[:1]) is models[0]


def test_each_runs_gradient_is_the_one_it_has_alone() -> None:
    """One fused step's loss is the sum of the runs' mean losses, so run k's slice of every
    gradient is the gradient run k gets alone from its own batch (float64: EXACT)."""
    models = members("resnet8", (0, 1, 2))
    model = fused.fuse(copy.deepcopy(models))
    step = TrainStep(model, CPU, None, False, runs=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 9, 32, 32, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (8, 3), generator=g)
    losses, wrong = step(x, y)
    assert losses.shape == wrong.shape == (3,)
    fused_grads = {n: p.grad for n, p in model.named_parameters()}
    for k, m in enumerate(models):
        logits = m(x[:, 3 * k:3 * k + 3])
        loss = F.cross_entropy(logits, y[:, k])
        loss.backward()
        torch.testing.assert_close(losses[k], loss.detach(), rtol=EXACT, atol=EXACT)
        assert wrong[k] == (logits.argmax(1) != y[:, k]).sum()
        for name, p in m.named_parameters():
            scale = p.grad.abs().max()
            torch.testing.assert_close(fused_grads[name].chunk(3)[k], p.grad, rtol=0, atol=EXACT * scale, msg=name)


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_group_loader_gives_each_run_its_own_batches_bit_for_bit(channels_last: bool) -> None:
    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8), np.arange(100) % 10)
    mean, std = np.full((32, 32, 3), 0.4, np.float32), np.ones((1, 1, 3), np.float32)
    common = dict(device=CPU, train=True, channels_last=channels_last)
    grouped = TorchLoader(split, 16, mean, std, seed=(3, 5, 7), **common)
    singles = [TorchLoader(split, 16, mean, std, seed=s, **common) for s in (3, 5, 7)]
    for epoch in (0, 1):
        for (x, y), *alone in zip(grouped.epoch(epoch, 1), *(s.epoch(epoch, 1) for s in singles), strict=True):
            assert x.shape == (16, 9, 32, 32) and y.shape == (16, 3)
            assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
            for k, (xk, yk) in enumerate(alone):
                assert torch.equal(x[:, 3 * k:3 * k + 3], xk) and torch.equal(y[:, k], yk)


def losses(run: Path) -> list[float]:
    return [m["train_loss"] for m in rundir.MetricsLog(run).read() if "train_loss" in m]


SEEDS = (0, 1, 2)


def group_configs(tree: Path, folder: Path, seeds: tuple[int, ...] = SEEDS, **kw) -> list[RunConfig]:
    """Each seed's run of the group, in batches of 8 (what the checks compare is exact, or
    float64 with a bound, whatever the batch; a step of 3 runs costs 3 single steps)."""
    return [tiny_config(tree, folder / f"s{s}", seed=s, **{"batch_size": 8, **kw}) for s in seeds]


# float64 runs (ATen's convolutions, about 4x slower than fp32's oneDNN ones), on small_tree:
# 20 steps at batch 8, 2 epochs, every step logged, checkpoints at 10 and 20.
FP64 = dict(precision="fp64", iters=20, milestones=(10, 15), batch_size=8, log_every=1)


@pytest.fixture(scope="session")
def fp64_group(small_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The unbroken group of three in float64, 20 steps, one log point each: the reference
    every check of a regrouped or unfused continuation compares with (TRAJECTORY)."""
    folder = tmp_path_factory.mktemp("fp64-group")
    train_group(group_configs(small_tree, folder, **FP64))
    return folder


@pytest.fixture(scope="session")
def fp64_group_at_10(small_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same group stopped at its first checkpoint (iteration 10); tests copy it."""
    folder = tmp_path_factory.mktemp("fp64-group-at-10")
    assert train_group(group_configs(small_tree, folder, **FP64), stop_at=10) is None
    return folder


@pytest.fixture(scope="session")
def fp32_group(tiny_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The unbroken group of three in fp32: the reference of the bit-for-bit resume checks."""
    folder = tmp_path_factory.mktemp("fp32-group")
    train_group(group_configs(tiny_tree, folder))
    return folder


@pytest.fixture(scope="session")
def fp32_group_at(tiny_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The fp32 group stopped at its first checkpoint (10) and at its second (20, with 10 kept
    as the previous one); tests copy them."""
    stops = {}
    for step in (10, 20):
        stops[step] = tmp_path_factory.mktemp(f"fp32-group-at-{step}")
        assert train_group(group_configs(tiny_tree, stops[step]), stop_at=step) is None
    return stops


def copied(folder: Path, tmp_path: Path) -> Path:
    """A copy of a whole group's folder (group.json names its runs relative to each other)."""
    return Path(shutil.copytree(folder, tmp_path / "run"))


@FP64_GROUP
def test_run_k_of_a_group_is_the_run_seed_k_trains_alone(small_tree: Path, tmp_path: Path, fp64_group: Path) -> None:
    """Run 1, in the middle of the group (its slice is neither the first nor the last),
    trained alone: every logged loss agrees to TRAJECTORY, and so does the test error."""
    alone = train(tiny_config(small_tree, tmp_path / "alone", seed=1, **FP64))
    assert rel(losses(fp64_group / "s1"), losses(tmp_path / "alone")) < TRAJECTORY
    result = json.loads((fp64_group / "s1" / "results.json").read_text())
    assert result["test_error"] == alone["test_error"]
    # every run's directory is a single run's
    for seed in SEEDS:
        run = fp64_group / f"s{seed}"
        assert {p.name for p in run.iterdir()} == {"checkpoint.pt", "config.json", "group.json", "metrics.jsonl",
                                                   "results.json"}  # the previous checkpoint goes at the end
        assert RunDir(run).group() == [fp64_group / f"s{k}" for k in SEEDS]  # relative paths in group.json
        state = rundir.read_checkpoint(run)
        assert state.config.seed == seed and state.model["fc.weight"].shape == (10, 64)
        result = json.loads((run / "results.json").read_text())
        assert result["fused_with"] == [str(fp64_group / f"s{s}") for s in SEEDS]
        assert result["params"] == 75_290 and result["precision"] == "fp64"
    # evaluated alone, as any run: its single model, its own normalisation, the error the group recorded
    assert evaluate_main([str(fp64_group / "s2"), "--device", "cpu", "--json", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["test"]["error"] == \
        json.loads((fp64_group / "s2" / "results.json").read_text())["test_error"]


@FP32_GROUP
def test_a_group_resumes_bit_for_bit_from_any_of_its_runs(tiny_tree: Path, tmp_path: Path, fp32_group: Path) -> None:
    cut = group_configs(tiny_tree, tmp_path / "cut")
    assert train_group(cut, stop_at=13) is None
    assert train_main(["--resume", str(tmp_path / "cut" / "s1")]) == 0  # brings its whole group
    for s in SEEDS:
        a, b = (rundir.MetricsLog(d / f"s{s}").read() for d in (fp32_group, tmp_path / "cut"))
        assert deterministic(a) == deterministic(b)
        fa, fb = (rundir.read_checkpoint(d / f"s{s}") for d in (fp32_group, tmp_path / "cut"))
        assert all(torch.equal(fa.model[k], fb.model[k]) for k in fa.model)


@FP64_GROUP
def test_a_group_can_resume_one_run_at_a_time(tmp_path: Path, fp64_group: Path, fp64_group_at_10: Path) -> None:
    """`--fuse off` on resume: each run goes on alone from the group's common step, in the
    single-run format from then on (no previous checkpoint kept, no group named), and ends
    as the run of the unbroken group (TRAJECTORY)."""
    run = copied(fp64_group_at_10, tmp_path)
    assert train_main(["--resume", str(run / "s0"), "--fuse", "off"]) == 0
    for s in SEEDS:
        a, b = losses(fp64_group / f"s{s}"), losses(run / f"s{s}")
        assert a[:10] == b[:10] and rel(b, a) < TRAJECTORY
        state = rundir.read_checkpoint(run / f"s{s}")
        assert state.step == 20 and not (run / f"s{s}" / rundir.GROUP).exists()
        assert not (run / f"s{s}" / rundir.PREVIOUS).exists()


@FP64_GROUP
def test_a_group_resumed_one_run_at_a_time_and_stopped_again_resumes_run_by_run(
        tmp_path: Path, fp64_group: Path, fp64_group_at_10: Path, capsys: pytest.CaptureFixture) -> None:
    """`--fuse off` makes each run a single run before any of them trains, so a stop in the
    middle leaves runs that resume one by one, each from its own checkpoint."""
    run = copied(fp64_group_at_10, tmp_path)
    assert train_module.resume([str(run / "s0")], alone=True, stop_at=15) is None  # s0 stops at 15
    assert not any((run / f"s{s}" / rundir.GROUP).exists() for s in SEEDS)
    assert [rundir.read_checkpoint(run / f"s{s}").step for s in SEEDS] == [15, 10, 10]
    for s in (1, 0, 2):
        assert train_main(["--resume", str(run / f"s{s}")]) == 0
        a, b = losses(fp64_group / f"s{s}"), losses(run / f"s{s}")
        assert a[:10] == b[:10] and rel(b, a) < TRAJECTORY


@FP64_GROUP
def test_a_group_whose_runs_all_diverged_is_one_line_on_resume(
        tmp_path: Path, fp64_group_at_10: Path, capsys: pytest.CaptureFixture) -> None:
    run = copied(fp64_group_at_10, tmp_path)
    for s in SEEDS:
        with open(run / f"s{s}" / rundir.METRICS, "a") as f:
            f.write(json.dumps({"iter": 11, "diverged": "training diverged at iteration 11"}) + "\n")
    assert run_main(train_main, ["--resume", str(run / "s0")]) == 2
    assert "every run of" in capsys.readouterr().err.strip().splitlines()[-1]


@FP32_GROUP
@pytest.mark.parametrize("cut", ["previous-only", "current-missing"])
def test_a_kill_between_the_groups_checkpoint_writes_resumes_from_the_common_step(
        tmp_path: Path, fp32_group: Path, fp32_group_at: dict[int, Path], cut: str) -> None:
    """Saved at 10 and 20, then as if killed while the step-20 checkpoints were written:
    run 0 holds 20 (and 10), run 1 only 10 (its write never began), run 2 nothing current
    (killed between keeping the previous one and writing the new one). The group resumes
    from 10 and ends as the unbroken group."""
    run = copied(fp32_group_at[20], tmp_path)
    for s in (1, 2):
        d = run / f"s{s}"
        (d / rundir.PREVIOUS).replace(d / rundir.CHECKPOINT)
        if s == 2 and cut == "current-missing":
            (d / rundir.CHECKPOINT).replace(d / rundir.PREVIOUS)
    with rundir.resuming([run / "s0"]) as point:
        assert point.step == 10 and [s.path.name for s in point.saved] == ["s0", "s1", "s2"]
    assert train_main(["--resume", str(run / "s2")]) == 0
    for s in SEEDS:
        a, b = (rundir.MetricsLog(d / f"s{s}").read() for d in (fp32_group, run))
        assert deterministic(a) == deterministic(b)


@FP32_GROUP
@pytest.mark.parametrize("written", ["run 0's", "none"])
def test_a_group_killed_before_its_first_checkpoints_starts_again(tmp_path: Path, fp32_group: Path,
                                                                  fp32_group_at: dict[int, Path], written: str) -> None:
    """Killed while the first checkpoints were written (run 0's is, the others' are not), or
    before any: `--resume` of run 1 finds the others through group.json and the group
    starts again from iteration 0, ending as the unbroken group."""
    run = copied(fp32_group_at[10], tmp_path)
    for s in (1, 2) if written == "run 0's" else SEEDS:
        (run / f"s{s}" / rundir.CHECKPOINT).unlink()
    with rundir.resuming([run / "s1"]) as point:
        assert point.step == 0
    assert train_main(["--resume", str(run / "s1")]) == 0
    for s in SEEDS:
        a, b = (rundir.MetricsLog(d / f"s{s}").read() for d in (fp32_group, run))
        assert deterministic(a) == deterministic(b)


@FP64_GROUP
def test_a_diverging_run_stops_and_the_others_go_on(tmp_path: Path, fp64_group: Path, fp64_group_at_10: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    """Run 1's checkpoint is damaged (a weight of NaN): on resume it diverges at the next
    log point; it is stopped with its last good checkpoint kept, and runs 0 and 2 go on as
    a group of two that ends as the unbroken group of three (TRAJECTORY)."""
    run = copied(fp64_group_at_10, tmp_path)
    bad = run / "s1" / rundir.CHECKPOINT
    state = torch.load(bad, weights_only=True)
    state["model"]["fc.weight"][0, 0] = float("nan")
    torch.save(state, bad)
    capsys.readouterr()
    assert run_main(train_main, ["--resume", str(run / "s0")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"fastres: error: {run / 's1'}: training diverged at iteration 11")
    assert "last good checkpoint, iteration 10, is kept" in err and "the other 2 run(s) of its group finished" in err
    assert rundir.read_checkpoint(run / "s1").step == 10
    assert "diverged" in rundir.MetricsLog(run / "s1").read()[-1]
    assert not (run / "s1" / "results.json").exists()
    for s in (0, 2):
        assert rel(losses(run / f"s{s}"), losses(fp64_group / f"s{s}")) < TRAJECTORY
        result = json.loads((run / f"s{s}" / "results.json").read_text())
        assert result["fused_with"] == [str(run / f"s{k}") for k in (0, 2)]
    assert not RunDir(run / "s0").diverged() and RunDir(run / "s1").diverged()


def test_runs_that_cannot_share_a_graph_are_refused(tiny_tree: Path, tmp_path: Path) -> None:
    a = tiny_config(tiny_tree, tmp_path / "a")
    for other, words in [(dict(model="resnet14"), "differ in model"), (dict(shortcut="B"), "differ in shortcut"),
                         (dict(batch_size=32), "differ in batch_size"), (dict(val_split=20), "differ in val_split"),
                         (dict(seed=0), "would be the same run")]:
        with pytest.raises(UsageError, match=words):
            train_group([a, tiny_config(tiny_tree, tmp_path / "b", **{"seed": 1, **other})])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize(("extra", "env", "words"), [
    (["--seed", "1"], {}, "--seed and --seeds"),
    (["--loader", "dali"], {}, "--loader dali feeds one run"),
    ([], {"WORLD_SIZE": "2"}, "fused runs (several seeds or a sweep) train in one process"),
])
def test_fused_refusals_are_one_line(tiny_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                     monkeypatch: pytest.MonkeyPatch, extra: list[str], env: dict, words: str) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    argv = ["resnet8", "--data", str(tiny_tree), "--seeds", "0,1", "--fuse", "on", "--out", str(tmp_path / "runs"),
            "--device", "cpu", "--progress", "none", *extra]
    assert run_main(train_main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err
    assert not (tmp_path / "runs").exists()


def test_seeds_name_one_directory_per_run() -> None:
    args = build_parser().parse_args(["resnet56:B", "--seeds", "0,3", "--dataset", "cifar100"])
    cfgs = configs_from_args(args)
    assert [(c.seed, c.out) for c in cfgs] == [(0, "runs/cifar100-resnet56-B-seed0"),
                                               (3, "runs/cifar100-resnet56-B-seed3")]
    args = build_parser().parse_args(["resnet20", "--seeds", "1", "--out", "mine"])
    assert [c.out for c in configs_from_args(args)] == ["mine/resnet20-A-seed1"]
    with pytest.raises(UsageError, match="distinct"):
        configs_from_args(build_parser().parse_args(["resnet20", "--seeds", "1,1"]))
    with pytest.raises(UsageError, match="give --seeds"):
        configs_from_args(build_parser().parse_args(["resnet20", "--fuse", "on"]))


def test_the_plan_fuses_on_a_gpu_and_not_on_a_cpu() -> None:
    cfgs = [RunConfig("resnet20", "A", seed=s, out=f"r{s}") for s in range(5)]
    assert group.plan(cfgs, "auto", "cuda") == ([cfgs], None)
    assert group.plan(cfgs, "auto", "cuda", max_size=2)[0] == [cfgs[:2], cfgs[2:4], cfgs[4:]]
    sequential, note = group.plan(cfgs, "auto", "cpu")
    assert sequential == [[c] for c in cfgs] and "one after another (on a CPU" in note and "--fuse on" in note
    assert group.plan(cfgs, "auto", "cuda", world_size=2)[0] == [[c] for c in cfgs]
    assert group.plan(cfgs, "on", "cpu") == ([cfgs], None)
    assert group.plan(cfgs, "off", "cuda") == ([[c] for c in cfgs], None)
    dali = [dataclasses.replace(c, loader="dali") for c in cfgs]
    assert "--loader dali feeds one run" in group.plan(dali, "auto", "cuda")[1]


def test_seeds_on_a_cpu_train_one_after_another_by_default(tiny_tree: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    argv = ["resnet8", "--data", str(tiny_tree), "--seeds", "0,1", "--iters", "10", "--batch-size", "16",
            "--out", str(tmp_path), "--device", "cpu", "--progress", "none"]
    assert train_main(argv) == 0
    assert "training the 2 runs one after another (on a CPU" in capsys.readouterr().err
    for seed in (0, 1):
        result = json.loads((tmp_path / f"resnet8-A-seed{seed}" / "results.json").read_text())
        assert result["seed"] == seed and result["fused_with"] is None
        assert not (tmp_path / f"resnet8-A-seed{seed}" / rundir.PREVIOUS).exists()


def test_fp16_trains_fused_with_one_scaler(micro_tree: Path, tmp_path: Path) -> None:
    """fp16 with one GradScaler for the group (an overflow in any run skips the group's
    step). The fused step under torch.compile: the GPU check rehearsal's fused rows
    (tests/test_gpu_check.py; traced by Dynamo and AOTAutograd, without Inductor's codegen)."""
    cfgs = [tiny_config(micro_tree, tmp_path / f"s{s}", seed=s, iters=2, eval_every=2, log_every=2, batch_size=4,
                        amp=True, amp_dtype="fp16") for s in (0, 1)]
    results = train_group(cfgs)
    assert [r["precision"] for r in results] == ["fp16", "fp16"]
    records = rundir.MetricsLog(tmp_path / "s1").read()
    assert "skipped_steps" in records[-1] and np.isfinite(records[-1]["train_loss"])


def test_progress_shows_the_group_and_each_run(capsys: pytest.CaptureFixture) -> None:
    from fastres.progress import Reporter, format_group

    records = [{"iter": 100, "lr": 0.1, "train_loss": 1.5 + k, "train_error": 0.5, "test_error": 0.25, "it_s": 40.0}
               for k in range(2)]
    line = format_group(records, ["s3", "s7"])
    assert line.startswith("lr 0.1  40.0 it/s x2") and "s3 1.500/50.0%/25.0%" in line and "s7 2.500/" in line
    Reporter("plain", 1000, 0, "resnet20 x2").log(records, ["s3", "s7"])
    out = capsys.readouterr().out.splitlines()
    assert [o.split("  ")[1] for o in out] == ["s3", "s7"] and "loss 2.5000" in out[1]
