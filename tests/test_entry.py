"""`fastres COMMAND` / `python -m fastres COMMAND`: every tool behind one entry point, from any folder."""

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from conftest import subprocess_env

from fastres import report
from fastres.__main__ import COMMANDS
from fastres.__main__ import main as entry_main


def fastres(args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastres", *args], cwd=cwd, env=subprocess_env(cache),
                          capture_output=True, text=True, timeout=120)


def test_the_commands_are_listed_and_an_unknown_one_is_one_line(tmp_path: Path, _private_cache: Path) -> None:
    listed = fastres(["--help"], tmp_path, _private_cache)
    assert listed.returncode == 0 and all(f"  {name} " in listed.stdout for name in COMMANDS)
    unknown = fastres(["trian"], tmp_path, _private_cache)
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1 and "unknown command 'trian'" in unknown.stderr
    assert fastres([], tmp_path, _private_cache).returncode == 2


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_command_answers_help_from_another_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture, name: str) -> None:
    """In this process (a subprocess each would cost a torch import): the checkout's scripts
    are found from the package, not from the working folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the checkout scripts add the checkout; undone after
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the entry point names the command in argv
    with pytest.raises(SystemExit) as done:
        entry_main([name, "--help"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("usage: ")


def test_a_bad_option_is_one_line_through_the_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    """In this process, as the --help above; `python -m fastres` itself is run by the first
    test, and `python -m fastres.train resnet21`'s stderr, all of it, by test_train's
    test_cli_exit_code_without_traceback."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the entry point names the command in argv
    assert entry_main(["train", "resnet21"]) == 2
    assert capsys.readouterr().err == (
        "fastres: error: resnet21: depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...)\n")


def test_a_run_started_with_relative_paths_resumes_from_any_folder(
        tiny_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """`--data` is saved absolute and the printed resume command is quoted: pasted from
    another folder, it resumes (here: a run stopped at iteration 1, into "out dir/run")."""
    import shlex

    from fastres.cli import run_main
    from fastres.rundir import RunDir
    from fastres.train import main as train_main

    monkeypatch.chdir(tiny_tree.parent)
    out = tmp_path / "out dir" / "run"
    argv = ["resnet8", "--data", tiny_tree.name, "--iters", "4", "--milestones", "3", "--batch-size", "16",
            "--log-every", "2", "--eval-every", "4", "--checkpoint-every", "2", "--out", str(out),
            "--device", "cpu", "--progress", "plain"]
    def ctrl_c_at_once(self: object) -> None:
        self.signum = 2  # as if Ctrl-C came during the first step
    monkeypatch.setattr("fastres.train.StopFlag.__init__", ctrl_c_at_once)
    assert run_main(train_main, argv) == 130
    monkeypatch.undo()
    printed = capsys.readouterr().out
    command = printed.split("Continue with: ")[1].strip()
    assert command == f"python -m fastres.train --resume {shlex.quote(str(out))}"
    assert RunDir(out).config().data == str(tiny_tree)
    monkeypatch.chdir(tmp_path)
    assert run_main(train_main, shlex.split(command)[3:]) == 0
    assert RunDir(out).results()["iters"] == 4


def test_the_report_finds_its_reference_figures_beside_a_folder_named_fastres(tmp_path: Path,
                                                                               _private_cache: Path) -> None:
    """From the folder that holds a checkout named fastres (`~` for a clone in `~/fastres`),
    `import fastres` finds that folder first, as a namespace package (an editable install is
    found after the working folder): the report's reference table must not be looked up there."""
    try:
        metadata.distribution("fastres")
    except metadata.PackageNotFoundError:
        pytest.skip("fastres is not installed (pip install -e .): the case needs its editable finder")
    (tmp_path / "fastres").mkdir()
    env = subprocess_env(_private_cache)
    del env["PYTHONPATH"]  # on the path, the checkout's package would be found before the folder
    code = "import fastres, fastres.report as r; print(fastres.__file__, len(r._reference_rows()))"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    shadowed, rows = done.stdout.split()
    assert shadowed == "None"  # the case itself: fastres is the folder, a namespace package
    assert rows == str(len(report._reference_rows())) != "0"
