"""Runs that survive: divergence, failed writes, a second process, partial and stale files."""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import deterministic, forked_main, lock_held_elsewhere, tiny_config

from fastres import atomic, rundir
from fastres.cli import run_main
from fastres.config import RunConfig
from fastres.train import main as train_main
from fastres.train import train

# One worker for the whole module: its shared reference runs are trained once (pytest-xdist).
pytestmark = pytest.mark.xdist_group("reliability")


def argv(tree: Path, run: Path, *extra: str) -> list[str]:
    return ["resnet8", "--data", str(tree), "--iters", "20", "--milestones", "15", "--batch-size", "16",
            "--log-every", "5", "--eval-every", "10", "--checkpoint-every", "5", "--out", str(run), "--device", "cpu",
            "--progress", "none", *extra]


@pytest.fixture(scope="module")
def cli_ref(tiny_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The unbroken run of `argv`'s configuration, the reference of the failed-write resumes."""
    ref = tmp_path_factory.mktemp("cli-ref") / "ref"
    assert run_main(train_main, argv(tiny_tree, ref)) == 0
    return ref


@pytest.fixture
def tiny_ref(tiny_reference: tuple[Path, dict]) -> Path:
    """The unbroken run of `tiny_config`, the reference of the interrupted-file resumes."""
    return tiny_reference[0]


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_tree: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """lr 0.01 for 10 iterations, then 1e8: the run blows up after iteration 10."""
    run = tmp_path / "run"
    assert run_main(train_main, argv(tiny_tree, run, "--warmup-iters", "10", "--lr", "1e8")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "training diverged at iteration 15" in err and "learning rate (1e+08)" in err
    assert "last good checkpoint, iteration 10, is kept" in err
    state = rundir.read_checkpoint(run)
    assert state.step == 10 and all(v.isfinite().all() for v in state.model.values() if v.is_floating_point())
    last = rundir.MetricsLog(run).read()[-1]
    assert last["iter"] == 15 and "diverged" in last
    assert not (run / rundir.LOCK).exists() and not (run / "results.json").exists()


def test_a_directory_is_fsynced_after_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: calls.append(("replace", str(b))) or real_replace(a, b))
    atomic.write_bytes(tmp_path / "f.bin", b"data")
    assert [c[0] for c in calls] == ["fsync", "replace", "fsync"]
    assert calls[0][1].startswith(str(tmp_path / ".f.bin.")) and calls[2][1] == str(tmp_path)
    assert (tmp_path / "f.bin").read_bytes() == b"data" and os.listdir(tmp_path) == ["f.bin"]


@pytest.mark.parametrize(("target", "code", "text"), [(rundir.CHECKPOINT, errno.ENOSPC, "No space left on device"),
                                                      (rundir.RESULTS, errno.EROFS, "Read-only file system")])
def test_a_failed_write_is_one_line_and_the_previous_checkpoint_resumes(
        tiny_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
        cli_ref: Path, target: str, code: int, text: str) -> None:
    run, ref = tmp_path / "run", cli_ref
    writes = {"n": 0}
    real_mkstemp = atomic.tempfile.mkstemp

    def failing_mkstemp(*a, **kw):
        if kw["prefix"] == f".{target}.":
            writes["n"] += 1
            if writes["n"] == 2 or target == rundir.RESULTS:
                raise OSError(code, text)
        return real_mkstemp(*a, **kw)
    monkeypatch.setattr(atomic.tempfile, "mkstemp", failing_mkstemp)
    assert run_main(train_main, argv(tiny_tree, run)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and text in err and "previous version, if any, is intact" in err
    monkeypatch.undo()
    expected_step = 5 if target == rundir.CHECKPOINT else 20
    assert rundir.read_checkpoint(run).step == expected_step and not (run / rundir.LOCK).exists()
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    if expected_step < 20:
        assert run_main(train_main, ["--resume", str(run)]) == 0
        assert deterministic(rundir.MetricsLog(run).read()) == deterministic(rundir.MetricsLog(ref).read())


def test_a_second_process_is_refused_and_a_dead_ones_lock_taken_over(tiny_tree: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """The lock is a flock: held by a live process it refuses a second one, in one line that
    names the holder, before anything in the directory is touched; a lock file left by a
    process killed -9 holds nothing (the kernel released it) and is taken over."""
    run = tmp_path / "run"
    run.mkdir()
    lock = run / rundir.LOCK
    with lock_held_elsewhere(run) as holder:  # killed -9 when the block ends
        live = json.dumps(RunConfig(model="resnet8", shortcut="A", out=str(run)).to_dict())  # before its checkpoint
        (run / rundir.CONFIG).write_text(live)
        assert run_main(train_main, argv(tiny_tree, run)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"is in use by pid {holder.pid} on {os.uname().nodename}" in err
        assert (run / rundir.CONFIG).read_text() == live and json.loads(lock.read_text())["pid"] == holder.pid
    (run / rundir.CONFIG).unlink()
    assert json.loads(lock.read_text())["pid"] == holder.pid  # killed -9: its file stays, its flock is gone
    assert run_main(train_main, argv(tiny_tree, run, "--iters", "2", "--eval-every", "2")) == 0  # to the end
    assert f"taking over {lock} from pid {holder.pid}, no longer running" in capsys.readouterr().err
    assert not lock.exists()


def test_a_partial_metrics_line_is_dropped_on_resume(tiny_tree: Path, tmp_path: Path, tiny_ref: Path) -> None:
    ref, run = tiny_ref, tmp_path / "run"
    assert train(tiny_config(tiny_tree, run), stop_at=10) is None
    with open(run / rundir.METRICS, "a") as f:
        f.write('{"iter": 15, "train_lo')  # killed in the middle of an append
    assert [m["iter"] for m in rundir.MetricsLog(run).read()] == [5, 10]  # the cut line is skipped
    assert run_main(train_main, ["--resume", str(run)]) == 0
    assert deterministic(rundir.MetricsLog(run).read()) == deterministic(rundir.MetricsLog(ref).read())


def test_a_run_killed_before_its_first_checkpoint_starts_clean(tiny_tree: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    # 10 iterations, the first checkpoint at 10: a run and its reference cost 35 steps, not
    # tiny_config's 65 (the same stop at 5, the same two starts from iteration 0)
    def short(out: Path) -> RunConfig:
        return tiny_config(tiny_tree, out, iters=10, milestones=(5, 8))
    ref, run = tmp_path / "ref", tmp_path / "run"
    train(short(ref))
    assert train(short(run), stop_at=5) is None
    (run / rundir.CHECKPOINT).unlink()  # as if killed before the first checkpoint was written
    for resume in (False, True):
        with open(run / rundir.METRICS, "a") as f:
            f.write(json.dumps({"iter": 99, "train_loss": 1.0}) + "\n")  # stale lines that must not survive
        if resume:  # the finished run of the first pass, taken back to before its first checkpoint
            (run / rundir.CHECKPOINT).unlink()
            (run / rundir.RESULTS).unlink()
            assert run_main(train_main, ["--resume", str(run)]) == 0
        else:
            train(short(run))
        assert "stopped before its first checkpoint: removed its config.json, metrics.jsonl; starting it again from " \
               "iteration 0" in capsys.readouterr().err
        assert deterministic(rundir.MetricsLog(run).read()) == deterministic(rundir.MetricsLog(ref).read())
    assert torch.equal(rundir.read_checkpoint(run).model["fc.weight"], rundir.read_checkpoint(ref).model["fc.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True])
def test_kill_9_at_random_moments_then_resume_gives_the_unbroken_run(tiny_tree: Path, tmp_path: Path,
                                                                      _private_cache: Path, fused: bool) -> None:
    """SIGKILL a training process at random moments (checkpoint writes included: one every
    2 iterations), resume after each, until it finishes: the final metrics and weights are
    those of a run that was never killed, bit for bit, and every directory left was resumable.
    Fused: a group of two runs, resumed through one of them; each ends as in the unbroken group."""
    import random
    import signal

    from conftest import subprocess_env

    args = ["--iters", "300", "--milestones", "150,225", "--log-every", "1", "--eval-every", "50",
            "--checkpoint-every", "2", "--batch-size", "16", *(["--seeds", "0,1", "--fuse", "on"] if fused else [])]
    refs, outs = (tmp_path / "ref", tmp_path / "run")
    ref, run = (refs / "resnet8-A-seed1", outs / "resnet8-A-seed1") if fused else (refs, outs)
    env = subprocess_env(_private_cache)
    base = [sys.executable, "-m", "fastres.train", "resnet8", "--data", str(tiny_tree), "--device", "cpu",
            "--progress", "none", *args]
    assert subprocess.run([*base, "--out", str(refs)], env=env, timeout=300).returncode == 0
    rng, kills, starts = random.Random(0), 0, 0
    done = [outs / f"resnet8-A-seed{s}" / rundir.RESULTS for s in (0, 1)] if fused else [run / rundir.RESULTS]
    while not all(d.exists() for d in done):
        cmd = [sys.executable, "-m", "fastres.train", "--resume", str(run)] if run.exists() else [*base, "--out",
                                                                                                   str(outs)]
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
        starts += 1
        try:
            proc.wait(timeout=rng.uniform(0.5, 4.0))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            continue
        assert proc.returncode == 0, proc.stderr.read()
        assert starts < 200
    print(f"kill -9: {kills} kills survived in {starts} starts")
    assert kills >= 5
    for name in ("resnet8-A-seed0", "resnet8-A-seed1") if fused else ("",):
        run, ref = outs / name, refs / name
        assert deterministic(rundir.MetricsLog(run).read()) == deterministic(rundir.MetricsLog(ref).read())
        a, b = rundir.read_checkpoint(run).model, rundir.read_checkpoint(ref).model
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert json.loads((run / rundir.RESULTS).read_text())["test_error"] == \
            json.loads((ref / rundir.RESULTS).read_text())["test_error"]


def test_deterministic_is_recorded_and_sets_the_backends(tiny_tree: Path, tmp_path: Path) -> None:
    try:
        results = train(tiny_config(tiny_tree, tmp_path / "run", iters=5, eval_every=5, deterministic=True))
        assert results["config"]["deterministic"] is True and torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


def test_milestones_past_the_end_are_said(tiny_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    train(tiny_config(tiny_tree, tmp_path / "run", iters=5, eval_every=5, milestones=(3, 5, 9)))
    assert "milestones 5, 9 are not below --iters 5: the learning rate does not drop there" in capsys.readouterr().err


def test_divergence_before_any_checkpoint_says_none_is_kept(tiny_tree: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert run_main(train_main, [*argv(tiny_tree, run, "--lr", "1e30", "--log-every", "1")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "training diverged at iteration 2:" in err  # the first loss is the init's
    assert "no checkpoint was written before it" in err and "iteration 0" not in err
    assert not (run / rundir.CHECKPOINT).exists()


def test_rewritten_files_keep_the_umasks_mode(tiny_tree: Path, tmp_path: Path) -> None:
    """Atomic rewrites go through a temporary file that mkstemp makes 0600: the file put in
    place has the mode a plain open() gives under the umask (here 027: 0640)."""
    old = os.umask(0o027)
    try:
        train(tiny_config(tiny_tree, tmp_path / "run", iters=2, eval_every=2))
    finally:
        os.umask(old)
    for name in (rundir.CONFIG, rundir.RESULTS, rundir.CHECKPOINT, rundir.METRICS):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == 0o640, name


def test_paths_that_are_not_utf8_print_under_strict_utf8_streams(tiny_tree: Path, tmp_path: Path) -> None:
    """A run in a forked process (conftest.Forked) whose stdout is strict UTF-8, as
    PYTHONIOENCODING=utf-8:strict makes it, given the paths as a fresh interpreter decodes
    bytes in its argv (os.fsdecode)."""
    data = os.path.join(os.fsencode(tmp_path), b"data-\xff")
    shutil.copytree(tiny_tree, os.fsdecode(data))
    out = os.path.join(os.fsencode(tmp_path), b"run-\xfe")
    argv = ["resnet8", "--data", os.fsdecode(data), "--out", os.fsdecode(out), "--iters", "2", "--eval-every", "2",
            "--batch-size", "16", "--device", "cpu", "--progress", "plain"]
    proc = forked_main(train_main, argv, stdout_errors="strict")
    assert proc.wait(120) == 0, proc.stderr
    assert "results in " in proc.stdout and "run-\\udcfe" in proc.stdout  # escaped, not an encoding error
    assert os.path.exists(os.path.join(out, b"results.json"))


def test_a_resume_with_another_thread_count_says_bit_identity_is_lost(tiny_tree: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    run, threads = tmp_path / "run", torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert train(tiny_config(tiny_tree, run, iters=2, eval_every=2), stop_at=1) is None
    finally:
        torch.set_num_threads(threads)
    assert json.loads((run / rundir.CONFIG).read_text())["cpu_threads"] == threads + 1
    capsys.readouterr()
    assert run_main(train_main, ["--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert err.count(f"trained with {threads + 1} CPU threads and goes on with {threads}") == 1
    assert "no longer bit for bit" in err
    assert json.loads((run / rundir.RESULTS).read_text())["config"]["cpu_threads"] == threads + 1


@pytest.mark.parametrize("model", ["resnet2000000", "plain999999999999999999998"])
def test_a_depth_that_cannot_fit_is_one_line_before_any_data_is_read(model: str, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    assert run_main(train_main, [model, "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"),
                                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs at least" in err and "choose a smaller depth" in err
    assert not (tmp_path / "r").exists()
