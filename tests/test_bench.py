"""The benchmark harness runs end to end (a smoke test: it checks the harness, never a speed)."""

import gc
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import throughput  # noqa: E402
from fastres.data import loaders  # noqa: E402

# One worker for the whole module: its shared reference runs are trained once (pytest-xdist).
pytestmark = pytest.mark.xdist_group("bench")


FAILING = "+ channels_last"  # the row the shared run breaks on purpose (test_a_failing_row_...)


@pytest.fixture(scope="module")
def bench_run(tiny_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One run of the harness for every check below: the baseline and the eager rows, one of
    them made to fail (the compiled rows, fused ones included, are the GPU check rehearsal's:
    tests/test_gpu_check.py). It counts the passes over the training images (the mean) and the JSON rewrites as
    they happen."""
    from fastres.data import pixels

    out, saved, mean_passes = tmp_path_factory.mktemp("bench") / "bench.json", [], []
    real_stats, real_row = pixels.normalization_stats, throughput.Bench.row

    def row(self, model_name, setup):
        if setup.name == FAILING:
            raise RuntimeError("Expected all tensors to be on the same device")
        return real_row(self, model_name, setup)
    loaders._prepare.cache_clear()
    # The harness collects garbage after each of its 13 rows and loader measurements (0.2-0.3 s
    # each, mostly scanning torch's and pytest's own objects): frozen, they are not scanned, and
    # what the rows leave behind is still collected.
    gc.collect()
    gc.freeze()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(pixels, "normalization_stats", lambda *a, **k: mean_passes.append(1) or real_stats(*a, **k))
            mp.setattr(throughput.Bench, "row", row)
            assert throughput.main(["--device", "cpu", "--models", "resnet8,plain8", "--data", str(tiny_tree),
                                    "--warmup", "1", "--steps", "1", "--repeats", "2", "--loader-batches", "1",
                                    "--eval-batch", "20", "--setups", "0,1,2,3",
                                    "--out", str(out)], on_save=lambda r: saved.append(len(r["rows"]))) == 0
    finally:
        gc.unfreeze()
    return {"result": json.loads(out.read_text()), "saved": saved, "mean_passes": len(mean_passes)}


def test_throughput_harness_smoke(tiny_tree: Path, bench_run: dict) -> None:
    result = bench_run["result"]
    assert bench_run["saved"][:4] == [1, 2, 3, 4]  # the JSON is rewritten after every row, not only at the end
    rows = {r["name"]: r for r in result["rows"] if r["model"] == "resnet8"}
    assert [r["name"] for r in result["rows"]][0] == "baseline (DataLoader, eager fp32)"
    for name in ("fastres eager fp32", "+ amp"):
        row = rows[name]
        assert row["it_s"] > 0 and len(row["repeats"]) == 2 and row["eval_img_s"] > 0 and row["eval_first_s"] > 0
        assert row["speedup"] == pytest.approx(row["it_s"] / rows["baseline (DataLoader, eager fp32)"]["it_s"])
    assert str(tiny_tree) in result["data"] and "data" not in result["args"]
    assert all(isinstance(v, float) and v > 0 for v in result["loaders"].values())


def test_a_failing_row_is_recorded_and_the_others_still_run(bench_run: dict) -> None:
    rows = {r["name"]: r for r in bench_run["result"]["rows"] if r["model"] == "resnet8"}
    assert rows[FAILING]["error"] == "RuntimeError: Expected all tensors to be on the same device"
    assert rows["+ amp"]["it_s"] > 0 and "error" not in rows["+ amp"]


def test_the_mean_is_computed_once_for_all_rows(bench_run: dict) -> None:
    assert len(bench_run["result"]["rows"]) == 8
    assert bench_run["mean_passes"] == 1  # eight rows of two models and the loader measurements, one pass over the training images


def test_fusion_candidates_time_each_way_and_skip_streams_without_a_gpu(tmp_path: Path) -> None:
    from bench import fusion_candidates

    out = tmp_path / "candidates.json"
    assert fusion_candidates.main(["--models", "resnet8", "--runs", "1,2", "--batch-size", "8", "--iters", "1",
                                   "--repeats", "1", "--device", "cpu", "--out", str(out)]) == 0
    rows = {(r["runs"], r["candidate"]): r for r in json.loads(out.read_text())["rows"]}
    assert len(rows) == 8
    for runs in (1, 2):
        assert all(rows[runs, c]["run_it_s"] > 0 for c in ("sequential", "grouped", "vmap"))
        assert rows[runs, "streams"]["skipped"] == "CUDA streams need a GPU"


def test_no_row_starts_after_the_budget(tiny_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    throughput.main(["--device", "cpu", "--models", "resnet8,resnet14", "--data", str(tiny_tree), "--warmup", "1",
                     "--steps", "1", "--repeats", "1", "--setups", "0,1", "--budget-s", "0", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [r.get("skipped") for r in result["rows"]] == ["budget spent"] * 4
    assert set(result["loaders"].values()) <= {"budget spent", "DALI not installed"}


def test_key_rows_of_every_model_come_first() -> None:
    order = throughput.order_rows(["resnet20", "resnet56"], list(throughput.MATRIX))
    assert [(m, s.name) for m, s in order[:4]] == [
        ("resnet20", "baseline (DataLoader, eager fp32)"), ("resnet20", "+ compile"),
        ("resnet56", "baseline (DataLoader, eager fp32)"), ("resnet56", "+ compile")]
    assert len(order) == 2 * len(throughput.MATRIX)


def test_host_batches_reach_the_device_in_training_and_evaluation(tiny_tree: Path) -> None:
    """The host loader sends every batch, training and evaluation, through one hop (the
    'meta' device stands in for a GPU: a batch that skipped the hop would stay on the CPU)."""
    meta = torch.device("meta")
    data = loaders.build(loaders.prepare(str(tiny_tree)), loaders.Placement(meta, host=True), batch_size=32,
                         eval_batch_size=16)
    for loader in (data.train, data.evals["test"]):
        for x, y in loader.epoch(0):
            assert x.device == meta and y.device == meta
    x, y = next(loaders.build(loaders.prepare(str(tiny_tree)), loaders.Placement(torch.device("cpu"), host=True),
                              batch_size=32).train.epoch(0))
    assert x.device.type == "cpu" and x.shape == (32, 3, 32, 32)


def test_every_compile_is_static(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastres import step
    from fastres.models import build_model

    seen = {}
    monkeypatch.setattr(step.torch, "compile", lambda model, **kw: seen.update(kw) or model)
    step.TrainStep(build_model("resnet8"), torch.device("cpu"), None, compile=True)
    assert seen == {"mode": None, "dynamic": False}
