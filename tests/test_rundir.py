"""The run directory, owned by fastres.rundir: nothing that existed before is lost, whatever
is in the directory or in its files; every refusal is one line and exit status 2."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Forked, forked_main, lock_held_elsewhere, tiny_config

from fastres import checkpoint, rundir
from fastres import train as train_module
from fastres.cli import run_main
from fastres.errors import RunError
from fastres.evaluate import main as evaluate_main
from fastres.export import main as export_main
from fastres.predict import main as predict_main
from fastres.report import main as report_main
from fastres.rundir import RunDir, RunLock
from fastres.step import TrainStep
from fastres.train import main as train_main
from fastres.train import train

pytestmark = pytest.mark.xdist_group("rundir")  # one worker: the module's runs are trained once

ITERS = 4


def config(tree: Path, out: Path, **kw: Any):
    return tiny_config(tree, out, iters=ITERS, milestones=(3,), log_every=2, eval_every=ITERS, checkpoint_every=2,
                       **kw)


@pytest.fixture(scope="module")
def finished(tiny_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    train(config(tiny_tree, run))
    return run


@pytest.fixture(scope="module")
def stopped(tiny_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run stopped at iteration 2 (its checkpoint), to be resumed."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    assert train(config(tiny_tree, run), stop_at=2) is None
    return run


def copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file and folder under `root`, with its bytes: what must survive a refusal."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def one_line_error(capsys: pytest.CaptureFixture, *words: str) -> str:
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert last.startswith("fastres: error: ") and "Traceback" not in err, err
    assert all(w in last for w in words), (words, last)
    return last


def argv(tree: Path, out: Path | str) -> list[str]:
    return ["resnet8", "--data", str(tree), "--iters", str(ITERS), "--milestones", "3", "--batch-size", "16",
            "--log-every", "2", "--eval-every", str(ITERS), "--checkpoint-every", "2", "--out", str(out),
            "--device", "cpu", "--progress", "none"]


# --- a new run never deletes what fastres did not write -------------------------------------

def _user_file(run: Path) -> None:
    run.mkdir()
    (run / "notes.txt").write_text("mine")


def _foreign_config(run: Path) -> None:
    run.mkdir()
    (run / rundir.CONFIG).write_text('{"learning_rate": 0.1}')  # the user's own config.json
    (run / rundir.METRICS).write_text('{"iter": 1}\n')


def _subfolder(run: Path) -> None:
    (run / "older-run").mkdir(parents=True)


def _a_file(run: Path) -> None:
    run.write_text("not a folder")


@pytest.mark.parametrize(("prepare", "words"), [
    (_user_file, ("not a fastres run's (notes.txt)", "another --out")),
    (_foreign_config, ("not a fastres run's (config.json, metrics.jsonl)",)),
    (_subfolder, ("not a fastres run's (older-run)",)),
    (_a_file, ("is a file, not a folder",)),
])
def test_a_new_run_refuses_a_directory_with_files_it_did_not_write(
        tiny_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture, prepare: Callable[[Path], None],
        words: tuple[str, ...]) -> None:
    run = tmp_path / "run"
    prepare(run)
    before = snapshot(tmp_path)
    assert run_main(train_main, argv(tiny_tree, run)) == 2
    one_line_error(capsys, *words)
    assert snapshot(tmp_path) == before


def test_a_finished_run_is_never_redone_even_with_its_checkpoint_pruned(
        tiny_tree: Path, tmp_path: Path, finished: Path, capsys: pytest.CaptureFixture) -> None:
    run = copy(finished, tmp_path)
    (run / rundir.CHECKPOINT).unlink()  # pruned to save space: results, config and metrics stay
    before = snapshot(tmp_path)
    assert run_main(train_main, argv(tiny_tree, run)) == 2
    one_line_error(capsys, "holds a finished run (results.json)")
    assert snapshot(tmp_path) == before


def test_out_empty_is_the_current_directory_and_its_files_are_kept(
        tiny_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "thesis.tex").write_text("mine")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    assert run_main(train_main, argv(tiny_tree, "")) == 2
    one_line_error(capsys, "thesis.tex")
    assert snapshot(tmp_path) == before


def test_a_run_stopped_before_its_first_checkpoint_restarts_removing_only_its_own_files(
        tiny_tree: Path, tmp_path: Path, finished: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert train(config(tiny_tree, run), stop_at=2) is None  # a metrics line and a checkpoint, at iteration 2
    (run / rundir.CHECKPOINT).unlink()  # as if killed before it was written
    (run / f".{rundir.METRICS}.abc123.tmp").write_bytes(b"half")  # an atomic write cut short
    assert run_main(train_main, argv(tiny_tree, run)) == 0
    err = capsys.readouterr().err
    assert "removed its .metrics.jsonl.abc123.tmp, config.json, metrics.jsonl; starting it again" in err
    assert [m["iter"] for m in RunDir(run).metrics.read()] == [2, 4]
    assert RunDir(run).results()["test_error"] == RunDir(finished).results()["test_error"]


@pytest.mark.parametrize("how", ["data moved", "Ctrl-C"])
def test_a_restart_from_iteration_0_that_cannot_start_changes_nothing(
        tiny_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
        how: str) -> None:
    """`--resume` of a run stopped before its first checkpoint removes its files only once the
    data is read and the model built: a run that cannot start keeps them."""
    tree = Path(shutil.copytree(tiny_tree, tmp_path / "tree"))
    run = tmp_path / "run"
    assert train(config(tree, run), stop_at=2) is None
    (run / rundir.CHECKPOINT).unlink()
    if how == "data moved":
        tree.rename(tmp_path / "moved")
    else:
        def interrupted(*a: Any, **kw: Any) -> None:
            raise KeyboardInterrupt
        monkeypatch.setattr(train_module, "setup", interrupted)
    before = snapshot(run)
    assert run_main(train_main, ["--resume", str(run)]) == (2 if how == "data moved" else 130)
    assert snapshot(run) == before


# --- the lock ----------------------------------------------------------------------------------

def test_the_lock_cannot_be_held_twice_even_before_its_holder_writes_its_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pause between the lock file's creation and the write of its contents: a second
    process (forked: conftest.Forked) tried then finds a lock held, not an empty file it may
    take over."""
    tried: list[tuple[int, str]] = []
    write_owner = RunLock._write_owner

    def try_lock() -> None:
        RunLock._write_owner = write_owner  # the second process's own lock is not paused
        try:
            with RunLock(tmp_path):
                print("taken")
        except RunError as e:
            print(e)

    def paused(self: RunLock, fd: int) -> None:
        other = Forked(try_lock)
        assert other.wait(60) == 0, other.stderr
        tried.append((self.path.stat().st_size, other.stdout.strip()))
        write_owner(self, fd)

    monkeypatch.setattr(RunLock, "_write_owner", paused)
    with RunLock(tmp_path):
        assert json.loads((tmp_path / rundir.LOCK).read_text())["pid"] == os.getpid()
    assert tried == [(0, f"{tmp_path} is in use by another process; wait for it to finish, or pass another --out")]
    assert not (tmp_path / rundir.LOCK).exists()


@pytest.mark.parametrize("how", ["new run", "resume"])
def test_a_live_run_before_its_first_checkpoint_keeps_its_files(
        tiny_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture, how: str) -> None:
    """A second process (`--resume` of the live run, or a new run into its --out) is refused
    by the lock, which it takes before it reads or writes anything in the directory."""
    run = tmp_path / "run"
    assert train(config(tiny_tree, run), stop_at=1) is None
    (run / rundir.CHECKPOINT).unlink()  # the live run: config and metrics, no checkpoint yet
    with lock_held_elsewhere(run) as holder:
        before = snapshot(run)
        args = ["--resume", str(run)] if how == "resume" else argv(tiny_tree, run)
        assert run_main(train_main, args) == 2
        one_line_error(capsys, f"is in use by pid {holder.pid}")
        assert snapshot(run) == before


@pytest.mark.parametrize(("content", "words"), [
    ('{"host": "elsewhere", "pid": 1}', "names pid 1 on elsewhere"),  # a lock this host cannot judge
    ("my notes", "is not a fastres lock"),
])
def test_a_lock_file_that_is_not_this_hosts_is_never_taken_over(
        tiny_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture, content: str, words: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.LOCK).write_text(content)
    before = snapshot(tmp_path)
    assert run_main(train_main, argv(tiny_tree, run)) == 2
    one_line_error(capsys, words, "remove the file")
    assert snapshot(tmp_path) == before


def test_resume_of_a_folder_that_is_no_run_makes_no_lock_there(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"mine")
    before = snapshot(tmp_path)
    assert run_main(train_main, ["--resume", str(tmp_path / "photos")]) == 2
    one_line_error(capsys, "not a run directory")
    assert snapshot(tmp_path) == before


def test_a_full_disk_when_the_lock_is_written_is_one_line_and_leaves_nothing(
        tiny_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    def full(*a: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(rundir.os, "pwrite", full)
    run = tmp_path / "runs" / "run"
    assert run_main(train_main, argv(tiny_tree, run)) == 2
    one_line_error(capsys, f"cannot write {run / rundir.LOCK} (No space left on device)")
    assert list(tmp_path.iterdir()) == []  # the folders it made are gone, and no empty lock is left


def test_ctrl_c_during_start_up_is_one_line_and_leaves_nothing(
        tiny_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    def interrupted(*a: Any, **kw: Any) -> None:
        raise KeyboardInterrupt  # Ctrl-C while the data is read and the model built
    monkeypatch.setattr(train_module, "setup", interrupted)
    assert run_main(train_main, argv(tiny_tree, tmp_path / "run")) == 130
    assert capsys.readouterr().err == "fastres: interrupted\n"
    assert list(tmp_path.iterdir()) == []


# --- results are never lost ---------------------------------------------------------------------

def killed_at_results(argv: list[str]) -> int:
    """fastres.train's main, killed -9 (by itself) when it comes to write results.json."""
    rundir.RunDir.write_results = lambda self, results: os.kill(os.getpid(), signal.SIGKILL)
    return train_main(argv)


@pytest.mark.parametrize("final_record", ["logged", "lost too"])
def test_a_kill_between_the_final_checkpoint_and_the_results_is_repaired_on_resume(
        tiny_tree: Path, tmp_path: Path, finished: Path, capsys: pytest.CaptureFixture, final_record: str) -> None:
    """kill -9 after the final checkpoint, before results.json (of a forked process:
    conftest.Forked): `--resume` writes the results from the final checkpoint (the final
    evaluation redone if its record was lost too), and the report works again."""
    run = tmp_path / "runs" / "run"
    proc = forked_main(killed_at_results, argv(tiny_tree, run))
    assert proc.wait(300) == -signal.SIGKILL, proc.stderr[-2000:]
    assert RunDir(run).checkpoint().step == ITERS and RunDir(run).results() is None
    if final_record == "lost too":
        log = run / rundir.METRICS
        log.write_text("".join(line + "\n" for line in log.read_text().splitlines() if f'"iter": {ITERS},' not in line))
    assert run_main(train_main, ["--resume", str(run)]) == 0
    assert "results.json was lost after the final checkpoint: writing it again" in capsys.readouterr().err
    results, reference = RunDir(run).results(), RunDir(finished).results()
    assert results["test_error"] == reference["test_error"] and results["iters"] == ITERS
    assert run_main(train_main, ["--resume", str(run)]) == 0  # now finished: nothing to do
    assert "already finished" in capsys.readouterr().out
    assert run_main(report_main, [str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0


# --- a bad file is one line naming it, and is left as it was ----------------------------------

def _set(key: str, value: Any) -> Callable[[dict], Any]:
    def mutate(state: dict) -> dict:
        state[key] = value
        return state
    return mutate


def _set_config(key: str, value: Any) -> Callable[[dict], Any]:
    def mutate(state: dict) -> dict:
        state["config"][key] = value
        return state
    return mutate


def _drop(key: str) -> Callable[[dict], Any]:
    def mutate(state: dict) -> dict:
        del state[key]
        return state
    return mutate


def _tensor(key: str, name: str, value: torch.Tensor) -> Callable[[dict], Any]:
    def mutate(state: dict) -> dict:
        state[key][name] = value
        return state
    return mutate


# (variant, how the saved dict is changed, the words the one line must hold)
MALFORMED_CHECKPOINTS = [
    ("a list", lambda s: [1, 2], "not a fastres checkpoint"),
    ("config a list", _set("config", [1]), "config: expected an object"),
    ("config empty", _set("config", {}), "config: no field 'model'"),
    ("config a string", _set("config", "resnet8"), "config: expected an object"),
    ("model unknown", _set_config("model", "resnet21"), "depth must be 6n+2"),
    ("dataset imagenet", _set_config("dataset", "imagenet"), "unknown dataset 'imagenet'"),
    ("iters 3.5", _set_config("iters", 3.5), "field 'iters' should be an integer"),
    ("lr a string", _set_config("lr", "0.1"), "field 'lr' should be a number"),
    ("milestones a string", _set_config("milestones", "3"), "field 'milestones' should be a list of integers"),
    ("model an int", _set("model", 3), "field 'model' should be a state dict of tensors"),
    ("model empty", _set("model", {}), "field 'model' should be a state dict of tensors"),
    ("model holds an int", _set("model", {"fc.weight": 1}), "field 'model' should be a state dict of tensors"),
    ("format x", _set("format", "x"), "field 'format'"),
    ("format newer", _set("format", checkpoint.FORMAT + 1), "written by a newer fastres"),
    ("no step", _drop("step"), "no field 'step'"),
    ("step negative", _set("step", -1), "field 'step'"),
    ("step a string", _set("step", "2"), "field 'step'"),
    ("step past the end", _set("step", 10**6), "past the run's 4 iterations"),
    ("optimizer an int", _set("optimizer", 0), "field 'optimizer'"),
    ("optimizer without groups", _set("optimizer", {"state": {}}), "field 'optimizer'"),
    ("scaler a list", _set("scaler", []), "field 'scaler'"),
    ("loss_sum an int", _set("loss_sum", 5), "field 'loss_sum'"),
    ("wrong_sum of two", _set("wrong_sum", torch.zeros(2)), "field 'wrong_sum'"),
    ("window negative", _set("window", -1), "field 'window'"),
    ("train_time a string", _set("train_time", "x"), "field 'train_time'"),
    ("wall_time infinite", _set("wall_time", float("inf")), "field 'wall_time'"),
    ("optimizer state an int", _set("optimizer", {"state": {0: 5}, "param_groups": [{"params": [0]}]}),
     "field 'optimizer'"),
    ("normalization without std", _set("normalization", {"mean": torch.zeros(32, 32, 3)}), "'normalization'"),
    ("normalization misshapen", _set("normalization", {"mean": torch.zeros(3), "std": torch.ones(3)}),
     "'normalization' has shapes"),
    ("std zero", _set("normalization", {"mean": torch.zeros(1, 1, 3), "std": torch.zeros(1, 1, 3)}),
     "std that is not positive"),
]
# Well-formed fields whose tensors do not fit the model: found when they are loaded.
MISFIT_CHECKPOINTS = [
    ("a weight misshapen", _tensor("model", "fc.weight", torch.zeros(3, 3)), ""),
    ("a weight missing", lambda s: {**s, "model": {k: v for k, v in s["model"].items() if k != "fc.bias"}}, ""),
]


def _write_variant(run: Path, mutate: Callable[[dict], Any]) -> None:
    state = torch.load(run / rundir.CHECKPOINT, weights_only=True)
    torch.save(mutate(state), run / rundir.CHECKPOINT)


ENTRY_POINTS = {
    "evaluate": lambda run: run_main(evaluate_main, [str(run)]),
    "export": lambda run: run_main(export_main, [str(run), str(run.parent / "w.pt")]),
    "resume": lambda run: run_main(train_main, ["--resume", str(run)]),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize(("variant", "mutate", "words"), MALFORMED_CHECKPOINTS + MISFIT_CHECKPOINTS,
                         ids=[v[0] for v in MALFORMED_CHECKPOINTS + MISFIT_CHECKPOINTS])
def test_a_malformed_checkpoint_is_one_line_naming_the_file_and_field(
        tmp_path: Path, stopped: Path, capsys: pytest.CaptureFixture, entry: str, variant: str,
        mutate: Callable[[dict], Any], words: str) -> None:
    run = copy(stopped, tmp_path)
    _write_variant(run, mutate)
    before = snapshot(tmp_path)
    assert ENTRY_POINTS[entry](run) == 2
    one_line_error(capsys, str(run), words)
    assert snapshot(tmp_path) == before  # nothing written, nothing removed


MALFORMED_CONFIGS = [
    ("an array", "[1, 2]", "expected an object"),
    ("a string", '"resnet8"', "expected an object"),
    ("empty", "{}", "no field 'model'"),
    ("iters 3.5", {"iters": 3.5}, "field 'iters' should be an integer"),
    ("lr a string", {"lr": "0.1"}, "field 'lr' should be a number"),
    ("amp a string", {"amp": "yes"}, "field 'amp' should be true or false"),
    ("model unknown", {"model": "resnet21"}, "depth must be 6n+2"),
    ("loader unknown", {"loader": "magic"}, "loader 'magic'"),
    ("not JSON", "{iters: 4", "unreadable config"),
]


@pytest.mark.parametrize(("variant", "change", "words"), MALFORMED_CONFIGS, ids=[v[0] for v in MALFORMED_CONFIGS])
def test_a_hand_edited_config_is_one_line_on_resume(tiny_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    variant: str, change: Any, words: str) -> None:
    """A run stopped before its first checkpoint resumes from its config.json."""
    run = tmp_path / "run"
    assert train(config(tiny_tree, run), stop_at=1) is None
    (run / rundir.CHECKPOINT).unlink()
    saved = json.loads((run / rundir.CONFIG).read_text())
    text = json.dumps({**saved, **change}) if isinstance(change, dict) else change
    (run / rundir.CONFIG).write_text(text)
    before = snapshot(tmp_path)
    assert run_main(train_main, ["--resume", str(run)]) == 2
    one_line_error(capsys, str(run / rundir.CONFIG), words)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("line", ["42", "[1, 2]", '{"iter": "x"}', '{"iter": 0}', '{"iter": 3, "train_loss": [1]}',
                                  "not json, then a whole line"])
def test_a_metrics_line_that_is_not_a_record_is_one_line_on_resume_and_in_the_report(
        tmp_path: Path, stopped: Path, finished: Path, capsys: pytest.CaptureFixture, line: str) -> None:
    for source, entry in ((stopped, ["--resume"]), (finished, None)):
        run = Path(shutil.copytree(source, tmp_path / source.parent.name / "run"))
        with open(run / rundir.METRICS, "a") as f:
            f.write(line + "\n")
        before = snapshot(tmp_path)
        if entry:
            assert run_main(train_main, [*entry, str(run)]) == 2
        else:
            assert run_main(report_main, [str(run), "--out", str(tmp_path / "report")]) == 2
        number = len((run / rundir.METRICS).read_text().splitlines())
        one_line_error(capsys, f"{run / rundir.METRICS}, line {number}")
        assert snapshot(tmp_path) == before


def test_a_metrics_line_cut_by_a_kill_is_skipped(tmp_path: Path, stopped: Path) -> None:
    run = copy(stopped, tmp_path)
    with open(run / rundir.METRICS, "a") as f:
        f.write('{"iter": 3, "train_lo')  # the last line, with no newline: an append cut short
    assert [m["iter"] for m in RunDir(run).metrics.read()] == [2]


@pytest.mark.parametrize(("variant", "change", "words"), [
    ("an array", [], "not a fastres results file"),
    ("no test error", {"test_error": None}, "field 'test_error'"),
    ("test error a string", {"test_error": "3%"}, "field 'test_error'"),
    ("no config", {"config": None}, "field 'config'"),
    ("config bad", {"config": {"model": "resnet21"}}, "depth must be 6n+2"),
    ("params a float", {"params": 1.5}, "field 'params'"),
])
def test_a_bad_results_file_is_one_line_in_the_report(tmp_path: Path, finished: Path, capsys: pytest.CaptureFixture,
                                                      variant: str, change: Any, words: str) -> None:
    run = copy(finished, tmp_path)
    results = json.loads((run / rundir.RESULTS).read_text())
    (run / rundir.RESULTS).write_text(json.dumps({**results, **change} if isinstance(change, dict) else change))
    before = snapshot(tmp_path)
    assert run_main(report_main, [str(run), "--out", str(tmp_path / "report")]) == 2
    one_line_error(capsys, str(run / rundir.RESULTS), words)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["a run directory", "a folder with my report.md"])
def test_report_never_writes_over_a_run_or_a_users_report(tmp_path: Path, finished: Path,
                                                          capsys: pytest.CaptureFixture, where: str) -> None:
    run = copy(finished, tmp_path)
    out = run if where == "a run directory" else tmp_path / "mine"
    if out != run:
        out.mkdir()
        (out / "report.md").write_text("my report")
    before = snapshot(tmp_path)
    assert run_main(report_main, [str(run), "--out", str(out)]) == 2
    one_line_error(capsys, str(out))
    assert snapshot(tmp_path) == before
    assert run_main(report_main, [str(run), "--out", str(tmp_path / "report")]) == 0  # twice: an earlier report
    assert run_main(report_main, [str(run), "--out", str(tmp_path / "report")]) == 0


def test_resume_never_redoes_a_finished_run_or_takes_a_hand_edited_config(
        tmp_path: Path, finished: Path, stopped: Path, capsys: pytest.CaptureFixture) -> None:
    done = copy(finished, tmp_path / "a")
    (done / rundir.CHECKPOINT).unlink()  # pruned
    cut = copy(stopped, tmp_path / "b")
    edited = json.loads((cut / rundir.CONFIG).read_text())
    (cut / rundir.CONFIG).write_text(json.dumps({**edited, "iters": 60}))
    (cut / f".{rundir.CHECKPOINT}.x1y2.tmp").write_bytes(b"half a checkpoint")
    before = snapshot(tmp_path)
    assert run_main(train_main, ["--resume", str(done)]) == 2
    one_line_error(capsys, "finished run", "checkpoint is gone")
    assert run_main(train_main, ["--resume", str(cut)]) == 2
    one_line_error(capsys, str(cut / rundir.CONFIG), "differs from the config its checkpoint was saved with (iters)")
    assert snapshot(tmp_path) == before
    (cut / rundir.CONFIG).write_text(json.dumps(edited))  # put back: it resumes, and its temporary file goes
    assert run_main(train_main, ["--resume", str(cut)]) == 0
    assert not [p for p in cut.iterdir() if p.name.endswith(".tmp")]


def test_a_lock_that_is_a_link_is_never_followed(tiny_tree: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "important.txt").write_text("mine")
    (run / rundir.LOCK).symlink_to(tmp_path / "important.txt")
    assert run_main(train_main, argv(tiny_tree, run)) == 2
    one_line_error(capsys, str(run))
    assert (tmp_path / "important.txt").read_text() == "mine"


def test_report_out_naming_a_file_is_one_line(tmp_path: Path, finished: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "report.txt").write_text("mine")
    assert run_main(report_main, [str(finished), "--out", str(tmp_path / "report.txt")]) == 2
    one_line_error(capsys, "report.txt")
    assert (tmp_path / "report.txt").read_text() == "mine"


def test_a_momentum_buffer_of_another_shape_is_one_line_on_resume(tmp_path: Path, stopped: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    run = copy(stopped, tmp_path)
    state = torch.load(run / rundir.CHECKPOINT, weights_only=True)
    state["optimizer"]["state"][0]["momentum_buffer"] = torch.zeros(2)
    torch.save(state, run / rundir.CHECKPOINT)
    before = snapshot(tmp_path)
    assert run_main(train_main, ["--resume", str(run)]) == 2
    one_line_error(capsys, str(run), "does not fit", "momentum buffer of shape (2,)")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(("change", "words"), [({"shortcut": 5}, ""), ({"dataset": ["x"]}, ""),
                                               ({"dataset": "imagenet"}, ""), ({"precision": "fp8"}, ""),
                                               ({"model": "resnet21"}, "depth must be 6n+2")])
def test_a_hand_edited_export_description_is_one_line(tmp_path: Path, finished: Path, capsys: pytest.CaptureFixture,
                                                      change: dict, words: str) -> None:
    out = tmp_path / "w.pt"
    assert run_main(export_main, [str(finished), str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    out.with_suffix(".json").write_text(json.dumps({**meta, **change}))
    for entry in (evaluate_main, predict_main):
        args = [str(out)] if entry is evaluate_main else [str(out), str(out)]
        assert run_main(entry, args) == 2
        one_line_error(capsys, str(out.with_suffix(".json")), words)


def test_evaluate_never_writes_its_json_over_a_run_file(finished: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    run = copy(finished, tmp_path)
    before = snapshot(tmp_path)
    assert run_main(evaluate_main, [str(run), "--json", str(run / rundir.RESULTS)]) == 2
    one_line_error(capsys, "a run directory's own file name")
    assert snapshot(tmp_path) == before


# --- export writes only its own two files ---------------------------------------------------------

def test_export_never_replaces_a_run_file_or_a_users_file(tmp_path: Path, finished: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    run = copy(finished, tmp_path)
    (tmp_path / "mine.json").write_text('{"my": "notes"}')
    (tmp_path / "blob.pt").write_bytes(b"my own file")
    (tmp_path / "a-file").write_text("x")
    before = snapshot(tmp_path)
    for out, words in [(run / rundir.CHECKPOINT, "a run directory's own file name"),
                       (run / "config.pt", "a run directory's own file name"),  # its .json is config.json
                       (tmp_path / "mine.pt", "mine.json already exists and is not an earlier export"),
                       (tmp_path / "blob.pt", "blob.pt already exists and is not an earlier export"),
                       (tmp_path / "a-file" / "sub" / "w.pt", "cannot create")]:
        assert run_main(export_main, [str(run), str(out)]) == 2, out
        one_line_error(capsys, words)
        assert snapshot(tmp_path) == before
    # an earlier export is replaced by a new one (both of its files)
    assert run_main(export_main, [str(run), str(tmp_path / "w.pt")]) == 0
    assert run_main(export_main, [str(run), str(tmp_path / "w.pt")]) == 0
    assert json.loads((tmp_path / "w.json").read_text())["step"] == ITERS


# --- it/s after a resume ----------------------------------------------------------------------------

def test_it_s_after_a_resume_counts_the_steps_this_process_ran(
        tiny_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A clock that moves one second per training step and never otherwise: every logged
    it/s is then exactly 1, the first after a resume from a checkpoint between two log
    points included (before, it counted the steps of the window saved before the resume)."""
    now = [0.0]
    monkeypatch.setattr(train_module.Clock, "now", staticmethod(lambda: now[0]))
    step = TrainStep.__call__

    def one_second_step(self: TrainStep, *batch: torch.Tensor) -> Any:
        now[0] += 1.0
        return step(self, *batch)
    monkeypatch.setattr(TrainStep, "__call__", one_second_step)
    run = tmp_path / "run"
    cfg = tiny_config(tiny_tree, run, iters=12, milestones=(9,), log_every=4, eval_every=12, checkpoint_every=2)
    assert train(cfg, stop_at=6) is None  # checkpointed at 6, between the log points 4 and 8
    assert train_main(["--resume", str(run)]) == 0
    assert [(m["iter"], m["it_s"]) for m in RunDir(run).metrics.read()] == [(4, 1.0), (8, 1.0), (12, 1.0)]
    assert RunDir(run).results()["train_time_s"] == 12.0
