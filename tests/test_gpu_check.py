"""The GPU check's CPU rehearsal: every Python branch the GPU run takes, at tiny size."""

import importlib.util
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import subprocess_env

from fastres.cli import run_main

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts import compile_cache, gpu_check  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def test_rehearsal_runs_every_part_and_keeps_what_it_measured(tiny_tree: Path, tmp_path: Path,
                                                               _private_cache: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), "--data", str(tiny_tree), "--rehearse",
                           # a budget no machine spends, so no part is ever skipped for time on a slow or busy
                           # one (the rehearsal's prefix run has its own bound, REHEARSAL_RUN_S): what is checked
                           # is every branch, never how long it took; the timeout only guards against a hang
                           "--budget-s", "100000"],
                          env=subprocess_env(_private_cache), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["mode"] == "cpu rehearsal" and summary["versions"]["torch"]
    rows = {r["name"]: r for r in summary["throughput"]["result"]["rows"]}
    assert "fused x4" not in rows and "+ amp" not in rows
    x1, x2 = rows["fused x1"], rows["fused x2"]  # fused rows count run-iterations against x1 of the same run
    assert x1["run_it_s"] == x1["it_s"] and x2["run_it_s"] == 2 * x2["it_s"]
    assert x1["fused_speedup"] == 1 and x2["fused_speedup"] == pytest.approx(x2["run_it_s"] / x1["run_it_s"])
    measured = [rows["+ compile"], rows["+ compile, host loader"], rows["fused x2"]]
    dali = rows["+ compile, DALI loader"]
    if importlib.util.find_spec("nvidia.dali") is None:
        assert dali["skipped"] == "DALI not installed"
    else:
        measured.append(dali)
    for row in measured:
        assert row["it_s"] > 0 and row["eval_img_s"] > 0 and row["first_steps_s"] > 0 and row["eval_first_s"] > 0
    part = summary["agreement_fp64"]  # the CPU compares in fp64, where the bound holds on any processor
    assert part["ok"] and part["result"]["max_rel_loss_diff"] <= part["result"]["limit"] == 1e-9
    assert part["result"]["channels_last"] is False
    assert "agreement_bf16" not in summary and "agreement_fp32" not in summary
    full = summary["full_run"]["result"]
    # a prefix of the 64k schedule, stopped at its planned length or, on a slow or busy machine, by the deadline
    # (logged every iteration, so a prefix cut by the deadline after its first step has its metrics too)
    assert not full["full"] and full["planned_iters"] >= 10 and 0 < full["iters_done"] <= full["planned_iters"]
    assert full["metrics"][-1]["iter"] == full["iters_done"] and full["checkpoint"] == "resnet8-checkpoint.pt"
    files = sorted(p.name for p in out.iterdir())
    caches = summary["compile_cache"]  # packed when the caches this machine holds fit 16 MiB
    kept = [compile_cache.ARCHIVE] if caches["archive"] else []
    assert caches["files"] > 0 and (caches["archive"] or "over 16 MiB" in caches["skipped"])
    assert files == sorted(["gpu_check.json", "gpu_check.log", "resnet8-checkpoint.pt", *kept])
    assert all((out / f).stat().st_size <= 16 << 20 for f in files)
    assert "full run plan" in (out / "gpu_check.log").read_text()


def test_missing_data_is_refused_at_once(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_main(gpu_check.main, [str(tmp_path / "out"), "--data", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file or folder" in err and not (tmp_path / "out").exists()
    assert run_main(gpu_check.main, [str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data" in err


@pytest.mark.parametrize(("it_s", "left", "expected"), [
    (None, 1000.0, 0),  # no measured rate: nothing is started
    (1000.0, 300.0, 64_000),  # 64 s of steps + 30 s overhead fit
    (100.0, 330.0, 27_000),  # 0.9 * (330 - 30) s * 100 it/s, down to a log point
    (100.0, 20.0, 0),  # not even the overhead fits
])
def test_full_run_length(it_s: float | None, left: float, expected: int) -> None:
    assert gpu_check.full_run_length(it_s, first_s=0.0, eval_s=0.0, left_s=left) == expected


# One process plays both machines: it compiles cold with one Inductor cache, packs it, unpacks
# it into an empty folder and compiles the same function again with that folder as the cache
# and every in-memory cache cleared (torch's own temporary_cache_dir), printing the FX graph
# cache's hits before and after (one process: a torch import and a cold compile cost seconds).
ROUND_TRIP = """
import sys
from pathlib import Path
import torch
from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir
from scripts import compile_cache

there, home, again = map(Path, sys.argv[1:])
def compile_once():
    torch._dynamo.reset()
    torch.compile(lambda x: (x.sin() * 3 + 1).sum(), dynamic=False)(torch.ones(64))
    return torch._dynamo.utils.counters["inductor"]["fxgraph_cache_hit"]  # read after: reset clears it
with temporary_cache_dir(str(there)):
    cold = compile_once()
    packed = compile_cache.pack(home, compile_cache.cache_dirs())
unpacked = compile_cache.unpack(home / compile_cache.ARCHIVE, {"inductor": again})
with temporary_cache_dir(str(again)):
    warm = compile_once()
print(cold, warm, packed["files"], packed["bytes"], unpacked["files"])
"""


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_the_compile_caches_come_home_and_start_the_next_check_warm(tmp_path: Path, _private_cache: Path) -> None:
    """A real CPU compile's Inductor cache, packed and unpacked into an empty folder (the
    next machine): the same files, and there the same compile is a cache hit."""
    env = subprocess_env(_private_cache)
    env.pop("TRITON_CACHE_DIR", None)
    there, home, again = tmp_path / "there", tmp_path / "home", tmp_path / "again"
    home.mkdir()
    proc = subprocess.run([sys.executable, "-c", ROUND_TRIP, str(there), str(home), str(again)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cold, warm, packed, size, unpacked = map(int, proc.stdout.split())
    assert (cold, warm) == (0, 1) and packed == unpacked > 0 and 0 < size <= compile_cache.LIMIT
    assert sorted(p.name for p in home.iterdir()) == [compile_cache.ARCHIVE]  # no temporary left
    assert tree(again) == tree(there)
    small = compile_cache.pack(home, {"inductor": there}, limit=1000)
    assert small["archive"] is None and "over" in small["skipped"] and not list(home.glob(".*"))


def test_a_bad_compile_cache_archive_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 tiny_tree: Path) -> None:
    stray = tmp_path / "stray.tar.gz"
    with tarfile.open(stray, "w:gz") as tar:
        tar.add(tiny_tree / "test" / "cat", arcname="elsewhere/cat")
    for archive, says in ((stray, "'elsewhere/cat' is not under inductor/ or triton/"),
                          (tmp_path / "none.tar.gz", "no such file")):
        argv = [str(tmp_path / "out"), "--data", str(tiny_tree), "--compile-cache", str(archive)]
        assert run_main(gpu_check.main, argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err and not (tmp_path / "out").exists()
