"""`fastres COMMAND` / `python -m fastres COMMAND`: every tool behind one entry point, from any folder."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

from fastres.__main__ import COMMANDS


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
def test_each_command_answers_help_from_another_folder(tmp_path: Path, _private_cache: Path, name: str) -> None:
    proc = fastres([name, "--help"], tmp_path, _private_cache)
    assert proc.returncode == 0, proc.stderr[-500:]
    assert proc.stdout.startswith("usage: ") and "Traceback" not in proc.stderr


def test_a_bad_option_is_one_line_through_the_entry_point(tmp_path: Path, _private_cache: Path) -> None:
    proc = fastres(["train", "resnet21"], tmp_path, _private_cache)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "fastres: error: resnet21: depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...)")
