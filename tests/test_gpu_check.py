"""The GPU check's CPU rehearsal: every Python branch the GPU run takes, at tiny size."""

import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from conftest import subprocess_env

from fastres.cli import run_main
from fastres.data import loaders

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import throughput  # noqa: E402
from scripts import compile_cache, gpu_check  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


PARTS = ["smoke", "resnet20", "full_run", "resnet56", "fused", "ablation", "agreement_fp64"]  # the rehearsal's


def test_rehearsal_runs_every_part_and_keeps_what_it_measured(tiny_tree: Path, tmp_path: Path,
                                                               _private_cache: Path) -> None:
    out, inductor = tmp_path / "out", tmp_path / "inductor"
    (inductor / "fxgraph").mkdir(parents=True)  # a cache entry of an earlier compile, for the packing to bring home
    (inductor / "fxgraph" / "entry").write_bytes(b"compiled")
    env = {**subprocess_env(_private_cache), "TORCHINDUCTOR_CACHE_DIR": str(inductor)}
    env.pop("TRITON_CACHE_DIR", None)  # Triton's cache inside Inductor's: only the entry above is packed
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), "--data", str(tiny_tree), "--rehearse",
                           # a budget no machine spends, so no part is ever skipped for time on a slow or busy
                           # one (the rehearsal's prefix run has its own bound, REHEARSAL_RUN_S): what is checked
                           # is every branch, never how long it took; the timeout only guards against a hang
                           "--budget-s", "100000"],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["mode"] == "cpu rehearsal" and summary["versions"]["torch"]
    assert summary["compiler"] == gpu_check.REHEARSAL_BACKEND == "aot_eager_decomp_partition"  # no Inductor codegen
    assert summary["note"] == gpu_check.REHEARSAL_NOTE  # its figures are no measurements
    assert all(summary[k]["ok"] for k in PARTS)
    log = (out / "gpu_check.log").read_text()
    assert [log.index(f"== {k} (") for k in PARTS] == sorted(log.index(f"== {k} (") for k in PARTS)  # run in order
    smoke = summary["smoke"]["result"]
    batches = {smoke["batch_size"], summary["agreement_fp64"]["result"]["batch_size"],
               summary["full_run"]["result"]["batch_size"],
               *(summary[part]["result"]["batch_size"] for part in ("resnet20", "resnet56", "fused", "ablation"))}
    assert batches == {gpu_check.REHEARSAL_BATCH}  # every part's training batch (the GPU's: 128)
    assert smoke["problems"] == [] and smoke["counters"]["unique_graphs"] == gpu_check.SMOKE_GRAPHS
    profile = smoke["profile"]  # on a CPU: no kernels (null, with the reason), host figures measured
    assert profile["kernels_per_step"] is None and profile["kernels_note"] and profile["gpu_ms_per_step"] is None
    assert profile["cpu_ms_per_step"] > 0 and profile["cpu_ops_per_step"] > 0
    figures = summary["figures"]  # every GPU figure has its field, null where the CPU cannot measure it
    assert set(figures) >= {"smoke_ok", "smoke_counters", "kernels_per_step", "cpu_ms_per_step", "gpu_ms_per_step",
                            "cold_first_step_s", "warm_first_steps_s", "it_s", "baseline_ratio", "meets_target",
                            "full_run_final_test_error", "fused_layout", "whole_step_agrees", "fused_speedup"}
    assert figures["fused_speedup"] == {"fused-x8": None, "fused-x8-nchw": None}  # x8: a GPU's rows
    assert figures["whole_step_agrees"] is None and "agreement_whole_step" not in summary  # a GPU's part
    assert figures["it_s"]["resnet20 compile"] > 0 and figures["baseline_ratio"]["resnet20"] > 0
    assert set(figures["meets_target"].values()) == {None}  # targets are checked on a GPU only
    assert summary["fused_layout"]["faster"] is None and "not both measured" in summary["fused_layout"]["reason"]
    rows = {(part, r["tag"]): r for part in ("resnet20", "resnet56", "fused", "ablation")
            for r in summary[part]["result"]["rows"]}
    assert [r["tag"] for r in summary["resnet20"]["result"]["rows"]] == ["compile", "baseline"]
    assert not any(r["loader"] == "dali" for r in rows.values())  # DALI is not in the check
    assert set(summary["ablation"]["result"]["loaders"]) == {label for label, s in throughput.LOADERS
                                                             if s.loader != "dali"}
    x1, x2 = rows["fused", "fused-x1"], rows["fused", "fused-x2"]  # fused rows count run-iterations against x1
    assert x1["run_it_s"] == x1["it_s"] and x2["run_it_s"] == 2 * x2["it_s"]
    assert x1["fused_speedup"] == 1 and x2["fused_speedup"] == pytest.approx(x2["run_it_s"] / x1["run_it_s"])
    for row in (rows["resnet20", "compile"], rows["ablation", "host"], x2):
        assert row["it_s"] > 0 and row["eval_img_s"] > 0 and row["first_steps_s"] > 0 and row["eval_first_s"] > 0
        assert row["cpu_ms_per_step"] > 0 and row["kernels_per_step"] is None
    assert rows["resnet20", "compile"]["target"] is None  # ResNet-8 has none
    part = summary["agreement_fp64"]  # judged in fp64 on a CPU, to a bound no processor's rounding reaches
    assert part["result"]["max_rel_loss_diff"] <= part["result"]["limit"] == gpu_check.AGREE_REL["fp64"]
    assert summary["smoke"]["result"]["limit"] is None  # fp32/bf16 agreement is recorded, not judged, on a CPU
    assert rows["ablation", "whole-step"]["skipped"] == "the whole-step graph needs CUDA"
    assert figures["it_s"]["ablation whole-step"] is None
    assert [r["tag"] for r in summary["ablation"]["result"]["rows"]] == gpu_check.ABLATION_ROWS.split(",")
    for tag in ("per-batch", "loss-outside", "neither"):  # the full step with a part undone: what each gains
        assert figures["it_s"][f"ablation {tag}"] == rows["ablation", tag]["it_s"] > 0
    assert rows["ablation", "per-batch"]["made_in_slabs"] is rows["ablation", "neither"]["made_in_slabs"] is False
    assert rows["ablation", "loss-outside"]["made_in_slabs"] is not None  # as the size rule chose
    full = summary["full_run"]["result"]
    # a prefix of the 64k schedule, stopped at its planned length or, on a slow or busy machine, by the deadline
    # (logged every iteration, so a prefix cut by the deadline after its first step has its metrics too)
    assert not full["full"] and full["planned_iters"] >= 10 and 0 < full["iters_done"] <= full["planned_iters"]
    assert full["metrics"][-1]["iter"] == full["iters_done"] and full["checkpoint"] == "resnet8-checkpoint.pt"
    assert full["measured_it_s"] == rows["resnet20", "compile"]["it_s"]  # planned from part 2's warm rate
    assert full["new_graphs"] == 0  # the smoke test's graph, reused
    files = sorted(p.name for p in out.iterdir())
    caches = summary["compile_cache"]  # what the cache holds, packed (the rehearsal's compiler writes nothing there)
    assert caches["files"] == 1 and caches["archive"] == compile_cache.ARCHIVE
    with tarfile.open(out / compile_cache.ARCHIVE) as tar:
        assert tar.extractfile("inductor/fxgraph/entry").read() == b"compiled"
    assert files == sorted(["gpu_check.json", "gpu_check.log", "resnet8-checkpoint.pt", compile_cache.ARCHIVE])
    assert len(files) <= 8 and all((out / f).stat().st_size <= 16 << 20 for f in files)
    assert "full run plan" in log and f"its last checkpoint is {out / 'resnet8-checkpoint.pt'}" in log


def counters(skips: int = 0, breaks: dict[str, int] | None = None, graphs: int = 1) -> dict[str, dict[str, int]]:
    return {"inductor": {"cudagraph_skips": skips}, "graph_break": breaks or {}, "stats": {"unique_graphs": graphs}}


@pytest.mark.parametrize(("seen", "says"), [
    (counters(), None),
    (counters(skips=2), "2 CUDA-graph skip(s)"),
    (counters(breaks={"data-dependent branch": 1}), "1 graph break(s): data-dependent branch"),
    (counters(graphs=2), "2 Dynamo graphs, 1 expected: a recompile"),
])
def test_the_smoke_verdict_names_every_skip_break_and_recompile(seen: dict, says: str | None) -> None:
    assert gpu_check.smoke_verdict(seen) == ([says] if says else [])


def test_a_failing_smoke_test_fails_the_check(tmp_path: Path) -> None:
    """A verdict with a problem: the part is recorded failed, with what it saw, and counted
    among the failed parts, which make main's exit status 1."""
    check = gpu_check.Check(tmp_path, time.monotonic(), 100.0, {})
    seen = {"problems": gpu_check.smoke_verdict(counters(skips=1)), "counters": {"cudagraph_skips": 1}}
    check.part("smoke", lambda: gpu_check.judged(check, seen))
    assert check.summary["smoke"]["ok"] is False and check.summary["smoke"]["partial"] == seen
    assert "CUDA-graph skip" in check.summary["smoke"]["error"] and gpu_check.failed_parts(check.summary) == ["smoke"]
    assert json.loads((tmp_path / gpu_check.JSON).read_text())["smoke"]["ok"] is False  # saved at once


def test_a_part_that_would_not_end_in_time_is_skipped_and_says_why(tmp_path: Path) -> None:
    """A part is given what a cold compile took in the smoke test; with less left it never
    starts (a kill at the command's limit would lose the caches' packing after it)."""
    summary = {"smoke": {"ok": True, "result": {"first_step_s": 40.0}}}
    assert gpu_check.cold_compile_s(summary) == 40.0 and gpu_check.cold_compile_s({}) == gpu_check.FALLBACK_ROW_S
    check = gpu_check.Check(tmp_path, time.monotonic(), 30.0, summary)
    ran = []
    check.part("agreement_fp32", lambda: ran.append(1), needs_s=gpu_check.cold_compile_s(summary))
    assert ran == [] and check.summary["agreement_fp32"]["skipped"].startswith("needs about 40 s, ")
    assert gpu_check.failed_parts(check.summary) == []  # skipped for time: not failed
    check.part("loaders", lambda: ran.append(2), needs_s=10.0)
    assert ran == [2] and check.summary["loaders"]["ok"]


def test_a_skipped_or_absent_agreement_is_no_verdict() -> None:
    assert gpu_check.agrees(None) is None and gpu_check.agrees({"ok": False, "skipped": "needs about 40 s"}) is None
    assert gpu_check.agrees({"ok": False, "error": "AssertionError: differ"}) is False
    assert gpu_check.agrees({"ok": True, "result": {}}) is True


def test_the_fused_layout_is_the_faster_of_the_two() -> None:
    rows = [{"tag": "fused-x8", "it_s": 100.0}, {"tag": "fused-x8-nchw", "it_s": 400.0}]
    assert gpu_check.fused_layout(rows) == {"faster": "nchw", "ratio": 4.0,
                                            "it_s": {"channels_last": 100.0, "nchw": 400.0}}
    assert gpu_check.fused_layout(rows[:1])["faster"] is None


def test_data_too_small_for_a_batch_is_refused_at_once(micro_tree: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    loaders._prepare.cache_clear()  # decoded here (this test's own disk cache), and said so
    assert run_main(gpu_check.main, [str(tmp_path / "out"), "--data", str(micro_tree), "--rehearse"]) == 2
    captured = capsys.readouterr()
    assert captured.err == (f"fastres: error: --data: 20 training images make no batch of {gpu_check.REHEARSAL_BATCH}; "
                            f"the check needs at least {gpu_check.REHEARSAL_BATCH}\n")
    assert captured.out.startswith(f"fastres: decoding the train and test images of {micro_tree} ")
    assert not (tmp_path / "out").exists()


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
    # a matrix product: Inductor calls ATen's kernel, so the cache entry is real but no C++ is
    # compiled (one pointwise kernel cost 15 s of g++ here, mostly probing the vector ISAs)
    torch.compile(lambda x: x @ x, dynamic=False)(torch.ones(8, 8))
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
    (tmp_path / "empty").mkdir()
    none = compile_cache.pack(home, {"inductor": tmp_path / "empty", "triton": tmp_path / "absent"})
    assert none == {"archive": None, "files": 0, "skipped": "the compile caches are empty"}
    assert sorted(p.name for p in home.iterdir()) == [compile_cache.ARCHIVE]  # the earlier archive, untouched


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
