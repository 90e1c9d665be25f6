"""The GPU check's CPU rehearsal: every Python branch the GPU run takes, at tiny size."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts import gpu_check  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def test_rehearsal_runs_every_part_and_keeps_what_it_measured(tiny_tree: Path, tmp_path: Path,
                                                               _private_cache: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), "--data", str(tiny_tree), "--rehearse",
                           "--budget-s", "300"],  # generous: a slow or busy machine still runs every part
                          env=subprocess_env(_private_cache), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["mode"] == "cpu rehearsal" and summary["versions"]["torch"]
    rows = {r["name"]: r for r in summary["throughput"]["result"]["rows"]}
    assert "fused x4" not in rows and "+ amp" not in rows and rows["fused x2"]["fused_speedup"] > 0
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
    assert "agreement_bf16" not in summary and "agreement_fp32" not in summary
    full = summary["full_run"]["result"]
    # a prefix of the 64k schedule, stopped at its planned length or, on a slow or busy machine, by the deadline
    assert not full["full"] and full["planned_iters"] % 10 == 0 and 0 < full["iters_done"] <= full["planned_iters"]
    assert full["metrics"][-1]["iter"] <= full["planned_iters"] and full["checkpoint"] == "resnet8-checkpoint.pt"
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_check.json", "gpu_check.log", "resnet8-checkpoint.pt"]
    assert "full run plan" in (out / "gpu_check.log").read_text()


def test_missing_data_is_refused_at_once(tmp_path: Path, _private_cache: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "out"), "--data", str(tmp_path / "nowhere")],
                          env=subprocess_env(_private_cache), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no such file or folder" in proc.stderr
    assert not (tmp_path / "out").exists()
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "out")], env=subprocess_env(_private_cache),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--data" in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.parametrize(("it_s", "left", "expected"), [
    (None, 1000.0, 0),  # no measured rate: nothing is started
    (1000.0, 300.0, 64_000),  # 64 s of steps + 30 s overhead fit
    (100.0, 330.0, 27_000),  # 0.9 * (330 - 30) s * 100 it/s, down to a log point
    (100.0, 20.0, 0),  # not even the overhead fits
])
def test_full_run_length(it_s: float | None, left: float, expected: int) -> None:
    assert gpu_check.full_run_length(it_s, first_s=0.0, eval_s=0.0, left_s=left) == expected


def test_the_deadline_stops_the_full_run_with_a_checkpoint(tiny_tree: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A run planned in full that would overrun: the timer's SIGTERM stops it at the
    deadline, as Ctrl-C would, and its checkpoint is kept to resume elsewhere."""
    monkeypatch.setattr(gpu_check, "full_run_length", lambda *a: 64_000)
    out = tmp_path / "out"
    out.mkdir()
    check = gpu_check.Check(out, gpu_check.time.monotonic(), 4.0, {})
    result = gpu_check.full_run(check, str(tiny_tree), "resnet8", tmp_path / "run", margin_s=2.0)
    assert result["full"] and not result["finished"] and 0 < result["iters_done"] < 64_000
    assert (out / "resnet8-checkpoint.pt").is_file()
