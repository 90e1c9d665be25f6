import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import deterministic, forked_main, subprocess_env, tiny_config

from fastres import checkpoint, rundir, runtime
from fastres.cli import run_main
from fastres.evaluate import main as evaluate_main
from fastres.models import CifarResNet
from fastres.train import main as train_main
from fastres.train import train

real_forward = CifarResNet.forward
@pytest.mark.xdist_group("reliability")  # with the other users of tiny_reference
def test_tiny_run_learns_and_writes_run_dir(tiny_reference: tuple[Path, dict]) -> None:
    run, results = tiny_reference
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl", "results.json"]
    metrics = rundir.MetricsLog(run).read()
    losses = [m["train_loss"] for m in metrics if "train_loss" in m]
    assert losses[-1] < 0.5 * losses[0]  # the classes differ by colour: easy to learn
    assert [m["lr"] for m in metrics if m["iter"] in (15, 20, 30)] == [0.1, 0.01, 0.001]  # milestones 15, 25
    saved = json.loads((run / "results.json").read_text())
    assert saved["test_error"] == metrics[-1]["test_error"] == results["test_error"]  # final iteration, not best
    assert saved["params"] == 75_290 and saved["config"]["model"] == "resnet8" and saved["versions"]["torch"]
    assert json.loads((run / "config.json").read_text()) == saved["config"]


@pytest.mark.xdist_group("reliability")  # with the other users of tiny_reference
def test_resume_is_bit_identical(tiny_tree: Path, tmp_path: Path, tiny_reference: tuple[Path, dict]) -> None:
    # stop_at takes the same path as SIGINT: checkpoint between steps, then return
    full, results = tiny_reference
    assert train(tiny_config(tiny_tree, tmp_path / "cut"), stop_at=13) is None
    assert rundir.read_checkpoint(tmp_path / "cut").step == 13
    assert train_main(["--resume", str(tmp_path / "cut")]) == 0
    a, b = (rundir.MetricsLog(d).read() for d in (full, tmp_path / "cut"))
    assert deterministic(a) == deterministic(b) and len(a) == 6
    sa, sb = (rundir.read_checkpoint(d).model for d in (full, tmp_path / "cut"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    cut = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert cut["test_error"] == results["test_error"]


def test_sigint_then_resume_is_bit_identical(tiny_tree: Path, tmp_path: Path) -> None:
    """Ctrl-C mid-run: the process (forked: conftest.Forked) is frozen (SIGSTOP) once it has
    logged 3 iterations, so where it stands is read before SIGINT reaches it, and the signal
    cannot lose a race with the end of the run: it arrives with at least 20 of 30 iterations
    still to go. The resume, in this process, ends as a run never stopped."""
    run, iters = tmp_path / "run", 30
    args = ["--iters", str(iters), "--milestones", "15,23", "--batch-size", "16", "--log-every", "1",
            "--eval-every", "15"]
    proc = forked_main(train_main, ["resnet8", "--data", str(tiny_tree), *args, "--out", str(run), "--device", "cpu",
                                    "--progress", "plain"])
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 3:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGSTOP)
    assert len(metrics.read_text().splitlines()) < iters - 20
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    assert proc.wait(60) == 130, proc.stderr
    assert "Traceback" not in proc.stderr and "--resume" in proc.stdout
    step = rundir.read_checkpoint(run).step
    assert 3 <= step < iters
    assert train_main(["--resume", str(run)]) == 0
    reference = tmp_path / "reference"
    train(tiny_config(tiny_tree, reference, iters=iters, milestones=(15, 23), batch_size=16, log_every=1,
                      eval_every=15, checkpoint_every=2000))
    a, b = rundir.MetricsLog(reference).read(), rundir.MetricsLog(run).read()
    assert deterministic(a) == deterministic(b) and len(a) == iters
    sa, sb = rundir.read_checkpoint(reference).model, rundir.read_checkpoint(run).model
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_deadline_stops_the_run_as_ctrl_c_does(tiny_tree: Path, tmp_path: Path) -> None:
    """A deadline already past (the GPU check's budget, spent) stops the run after its first
    step, with a checkpoint to resume from: read by the loop, never sent as a signal."""
    run = tmp_path / "run"
    assert train(tiny_config(tiny_tree, run, iters=2, eval_every=2), deadline=time.monotonic() - 1) is None
    assert rundir.read_checkpoint(run).step == 1
    assert train_main(["--resume", str(run)]) == 0 and rundir.read_checkpoint(run).step == 2


def test_finished_run_resume_is_a_no_op(tiny_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    train(tiny_config(tiny_tree, tmp_path / "run", iters=5, eval_every=5))
    assert train_main(["--resume", str(tmp_path / "run")]) == 0
    assert "already finished" in capsys.readouterr().out


def test_evaluate_cli(tiny_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = train(tiny_config(tiny_tree, tmp_path / "run", iters=10))
    assert evaluate_main([str(tmp_path / "run"), "--device", "cpu"]) == 0
    assert f"test error {100 * results['test_error']:.2f}%" in capsys.readouterr().out


def test_val_split_is_evaluated(tiny_tree: Path, tmp_path: Path) -> None:
    results = train(tiny_config(tiny_tree, tmp_path / "run", iters=10, val_split=40))
    assert results["val_error"] is not None and results["test_error"] is not None


@pytest.mark.parametrize("argv", [
    ["resnet21"], ["vgg16"], ["resnet20", "--shortcut", "D"], ["resnet20", "--iters", "0"],
    ["resnet20", "--batch-size", "-1"], ["resnet20", "--milestones", "48000,32000"], ["resnet20", "--iters", "x"],
    ["--resume", "/nonexistent/run"], ["resnet20", "--out", "/proc/fastres-run"], ["plain20", "--shortcut", "B"],
    [], ["resnet20", "--data", "/nonexistent/data"], ["resnet20", "--bogus"],
])
def test_bad_input_is_one_line_and_exit_2(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    assert run_main(train_main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastres: error: ") and err.count("\n") == 1


def test_existing_run_is_not_overwritten(tiny_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    train(tiny_config(tiny_tree, tmp_path / "run", iters=5, eval_every=5))
    argv = ["resnet8", "--data", str(tiny_tree), "--out", str(tmp_path / "run")]
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    assert run_main(train_main, argv) == 2
    assert "holds a finished run (results.json): fastres never redoes or clears one" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


def test_cli_exit_code_without_traceback(tmp_path: Path, _private_cache: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "fastres.train", "resnet21"], env=subprocess_env(_private_cache),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "fastres: error: resnet21: depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...)")


@pytest.mark.parametrize("native", [True, False])
def test_amp_precision_follows_the_cpu(micro_tree: Path, tmp_path: Path, native: bool,
                                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """--amp trains in bf16 only where the CPU computes it natively; elsewhere it says so
    once and trains in fp32. A forced bf16 still works, with a warning. The precision used
    is in the config and the results. On micro_tree in batches of 4, one step each: bf16 is
    emulated on an AVX2-only CPU, about 0.85 core-seconds a step of 32 images."""
    monkeypatch.setattr(runtime, "cpu_bf16_native", lambda: native)
    seen = []
    monkeypatch.setattr(CifarResNet, "forward", lambda self, x: seen.append(
        (x.dtype, x.is_contiguous(memory_format=torch.channels_last))) or real_forward(self, x))
    results = train(tiny_config(micro_tree, tmp_path / "auto", iters=1, eval_every=1, batch_size=4, amp=True,
                                channels_last=True))
    err = capsys.readouterr().err
    expected = "bf16" if native else "fp32"
    assert results["precision"] == expected and results["config"]["precision"] == expected
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["precision"] == expected
    assert err.count("AMP is off on this CPU") == (0 if native else 1)  # said once, only where it applies
    assert set(seen) == {(torch.bfloat16 if native else torch.float32, True)}  # what the model really receives

    forced = train(tiny_config(micro_tree, tmp_path / "forced", iters=1, eval_every=1, batch_size=4, amp=True,
                               amp_dtype="bf16"))
    assert forced["precision"] == "bf16"
    assert ("bf16 is emulated on this CPU" in capsys.readouterr().err) == (not native)


def test_fp16_trains_with_a_scaler(micro_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = train(tiny_config(micro_tree, tmp_path / "fp16", iters=2, eval_every=2, batch_size=4, amp=True,
                                amp_dtype="fp16", channels_last=True))
    assert results["precision"] == "fp16"
    assert "fp16 on a CPU runs ATen's reference convolutions, about 10x slower" in capsys.readouterr().err
    assert rundir.read_checkpoint(tmp_path / "fp16").scaler["scale"] > 0  # a live GradScaler state was saved


def test_resume_keeps_the_precision_on_another_cpu(micro_tree: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # 2 iterations of 4 images, stopped after 1: bf16 is emulated on an AVX2-only CPU, about
    # 0.85 core-seconds a step of 32 images
    run = tmp_path / "run"
    monkeypatch.setattr(runtime, "cpu_bf16_native", lambda: True)
    assert train(tiny_config(micro_tree, run, iters=2, eval_every=2, batch_size=4, amp=True), stop_at=1) is None
    monkeypatch.setattr(runtime, "cpu_bf16_native", lambda: False)  # resumed on an AVX2-only machine
    assert run_main(train_main, ["--resume", str(run)]) == 0
    assert json.loads((run / "results.json").read_text())["precision"] == "bf16"



def test_a_batch_larger_than_the_data_is_one_line_and_leaves_nothing(tiny_tree: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "nested" / "run"
    argv = ["resnet8", "--data", str(tiny_tree), "--batch-size", "256", "--out", str(out), "--device", "cpu"]
    assert run_main(train_main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "160 training images make no batch of 256" in err
    assert not (tmp_path / "nested").exists()


def test_the_trainer_takes_the_shortcut_in_the_model_name(tiny_tree: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    argv = ["resnet8:B", "--data", str(tiny_tree), "--iters", "2", "--eval-every", "2", "--out", str(tmp_path / "b"),
            "--device", "cpu", "--progress", "none"]
    assert run_main(train_main, argv) == 0
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    assert (saved["model"], saved["shortcut"], saved["params"]) == ("resnet8", "B", 78_042)
    assert run_main(train_main, ["resnet8:B", "--shortcut", "C", "--data", str(tiny_tree)]) == 2
    assert "names shortcut B, but --shortcut says C" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--lr", "nan"], ["--lr", "inf"], ["--wd", "nan"], ["--wd", "-1"],
                                 ["--momentum", "1.5"], ["--eval-every", "0"], ["--eval-batch-size", "0"],
                                 ["--lr", "1e300"], ["--wd", "1e300"], ["--seed", "99999999999999999999"],
                                 ["--seed", "-1"]])
def test_bad_numbers_are_one_line(bad: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_main(train_main, ["resnet8", "--out", str(tmp_path / "r"), *bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastres: error: ") and err.count("\n") == 1 and bad[0] in err
    assert not (tmp_path / "r").exists()


def test_checkpoint_format_newer_is_refused_older_is_read(tiny_tree: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert train(tiny_config(tiny_tree, run, iters=10), stop_at=5) is None
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["format"] == checkpoint.FORMAT == 1 and state["normalization"]["mean"].shape == (32, 32, 3)
    torch.save({**state, "format": checkpoint.FORMAT + 1}, run / "checkpoint.pt")
    assert run_main(train_main, ["--resume", str(run)]) == 2
    assert "written by a newer fastres (checkpoint format 2" in capsys.readouterr().err
    old = {k: v for k, v in state.items() if k not in ("format", "normalization")}  # as written before versions
    torch.save(old, run / "checkpoint.pt")
    assert run_main(evaluate_main, [str(run)]) == 0
    assert "predates saved normalisation" in capsys.readouterr().err
    assert run_main(train_main, ["--resume", str(run)]) == 0
    assert torch.load(run / "checkpoint.pt", weights_only=True)["format"] == checkpoint.FORMAT


def test_evaluation_needs_no_training_set(tiny_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    """Evaluation normalises with the checkpoint's own statistics and builds no training
    loader: on other data it never takes that data's mean."""
    run = tmp_path / "run"
    results = train(tiny_config(tiny_tree, run, iters=10, eval_every=10))
    capsys.readouterr()
    from fastres.data import pixels, torch_loader

    monkeypatch.setattr(pixels, "normalization_stats", lambda *a, **k: pytest.fail("computed training statistics"))
    real_init = torch_loader.TorchLoader.__init__

    def no_training_loader(self, *args, train: bool, **kw) -> None:
        assert not train, "built a training loader"
        real_init(self, *args, train=train, **kw)
    monkeypatch.setattr(torch_loader.TorchLoader, "__init__", no_training_loader)
    assert run_main(evaluate_main, [str(run)]) == 0
    assert f"test error {100 * results['test_error']:.2f}%" in capsys.readouterr().out


def test_evaluation_reads_a_test_split_alone(tiny_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A folder holding only test/ (or test.tar.gz) is enough to evaluate a checkpoint; to
    train, it is one line."""
    import shutil
    import tarfile

    run = tmp_path / "run"
    results = train(tiny_config(tiny_tree, run, iters=10, eval_every=10))
    capsys.readouterr()
    only_test = tmp_path / "only-test"
    shutil.copytree(tiny_tree / "test", only_test / "test")
    packed = tmp_path / "packed"
    packed.mkdir()
    with tarfile.open(packed / "test.tar.gz", "w:gz") as tar:
        tar.add(tiny_tree / "test", arcname="test")
    for data in (only_test, packed):
        assert run_main(evaluate_main, [str(run), "--data", str(data)]) == 0
        assert f"test error {100 * results['test_error']:.2f}%" in capsys.readouterr().out
    assert run_main(train_main, ["resnet8", "--data", str(only_test), "--out", str(tmp_path / "r2")]) == 2
    assert "no cifar10 there" in capsys.readouterr().err and not (tmp_path / "r2").exists()


def test_the_recorded_dali_version_is_the_one_dali_reports() -> None:
    """Read from the wheel's metadata, without importing DALI (runtime.dali_version)."""
    dali = pytest.importorskip("nvidia.dali")
    assert runtime.versions()["dali"] == dali.__version__
