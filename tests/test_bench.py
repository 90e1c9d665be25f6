"""The benchmark harness runs end to end (a smoke test: it checks the harness, never a speed)."""

import contextlib
import dataclasses
import gc
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import throughput  # noqa: E402
from fastres.cli import run_main  # noqa: E402
from fastres.data import loaders  # noqa: E402
from fastres.runtime import PRECISIONS  # noqa: E402

# One worker for the whole module: its shared reference runs are trained once (pytest-xdist).
pytestmark = pytest.mark.xdist_group("bench")


FAILING = "+ channels_last"  # the row the shared run breaks on purpose (test_a_failing_row_...)


@pytest.fixture(scope="module")
def bench_run(tiny_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One run of the harness for every check below: the baseline and the eager rows, one of
    them made to fail (the compiled rows, fused ones included, are the GPU check rehearsal's:
    tests/test_gpu_check.py, traced by Dynamo and AOTAutograd without Inductor's code generation).
    It counts the passes over the training images (the mean) and the JSON rewrites as they happen."""
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
    # what the rows leave behind is still collected. Imported first, so frozen with the rest:
    # torch._dynamo, which the first optimizer imports, and DALI, which the check of the DALI
    # rows' availability imports (without them, 14 collections took 2.5 core-seconds).
    import torch._dynamo  # noqa: F401

    with contextlib.suppress(ImportError):
        import nvidia.dali  # noqa: F401
    gc.collect()
    gc.freeze()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(pixels, "normalization_stats", lambda *a, **k: mean_passes.append(1) or real_stats(*a, **k))
            mp.setattr(throughput.Bench, "row", row)
            # batches of 32, not the paper's 128 (about 0.35 core-seconds a step here, 18 steps):
            # the harness is checked, not a speed
            assert throughput.main(["--device", "cpu", "--models", "resnet8,plain8", "--data", str(tiny_tree),
                                    "--batch-size", "32",
                                    "--warmup", "1", "--steps", "1", "--repeats", "2", "--loader-batches", "1",
                                    "--profile-steps", "1",
                                    "--eval-batch", "20", "--rows", "baseline,eager,channels-last,amp",
                                    "--out", str(out)], on_save=lambda r: saved.append(len(r["rows"]))) == 0
    finally:
        gc.unfreeze()
    return {"result": json.loads(out.read_text()), "saved": saved, "mean_passes": len(mean_passes)}


def test_throughput_harness_smoke(tiny_tree: Path, bench_run: dict) -> None:
    result = bench_run["result"]
    assert bench_run["saved"][:4] == [1, 2, 3, 4]  # the JSON is rewritten after every row, not only at the end
    rows = {r["name"]: r for r in result["rows"] if r["model"] == "resnet8"}
    assert [r["name"] for r in result["rows"]][0] == "baseline (DataLoader, eager fp32)"
    assert result["batch_size"] == 32 == result["args"]["batch_size"]
    for name in ("fastres eager fp32", "+ amp"):
        row = rows[name]
        assert row["it_s"] > 0 and len(row["repeats"]) == 2 and row["eval_img_s"] > 0 and row["eval_first_s"] > 0
        assert row["speedup"] == pytest.approx(row["it_s"] / rows["baseline (DataLoader, eager fp32)"]["it_s"])
    assert str(tiny_tree) in result["data"] and "data" not in result["args"]
    assert all(isinstance(v, float) and v > 0 for v in result["loaders"].values())


def test_every_row_names_its_precision_as_the_trainer_does(bench_run: dict) -> None:
    rows = {r["name"]: r for r in bench_run["result"]["rows"] if r["model"] == "resnet8"}
    assert rows["baseline (DataLoader, eager fp32)"]["precision"] == rows["fastres eager fp32"]["precision"] == "fp32"
    assert rows["+ amp"]["precision"] in PRECISIONS  # bf16, or fp32 on a CPU without native bf16


def test_a_failing_row_is_recorded_and_the_others_still_run(bench_run: dict) -> None:
    rows = {r["name"]: r for r in bench_run["result"]["rows"] if r["model"] == "resnet8"}
    assert rows[FAILING]["error"] == "RuntimeError: Expected all tensors to be on the same device"
    assert rows["+ amp"]["it_s"] > 0 and "error" not in rows["+ amp"]


def test_the_mean_is_computed_once_for_all_rows(bench_run: dict) -> None:
    assert len(bench_run["result"]["rows"]) == 8
    assert bench_run["mean_passes"] == 1  # eight rows of two models and the loaders: one pass over the images


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
                     "--steps", "1", "--repeats", "1", "--rows", "baseline,eager", "--budget-s", "0",
                     "--out", str(out)])
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


@pytest.mark.parametrize("host", [False, True])
def test_a_rows_slabs_reach_its_loader_and_are_recorded_as_made(tiny_tree: Path, host: bool) -> None:
    """The per-batch rows ask for batches one at a time (`Placement.slabs`), the others leave
    it to the size rule; each row records what its loader did, the host loader's too."""
    prepared = loaders.prepare(str(tiny_tree))
    for slabs in (False, True):
        data = loaders.build(prepared, loaders.Placement(torch.device("cpu"), host=host, slabs=slabs), batch_size=32)
        assert throughput.made_in_slabs(data.train) is slabs
    assert throughput.ROWS["per-batch"].slabs is False and throughput.ROWS["neither"].slabs is False
    assert throughput.ROWS["compile"].slabs is None  # the size rule's choice


@pytest.mark.parametrize(("given", "timed"), [([], 5), (["--loader-batches", "3"], 3)])
def test_a_loader_alone_is_timed_over_one_epoch_unless_told(tiny_tree: Path, monkeypatch: pytest.MonkeyPatch,
                                                           given: list[str], timed: int) -> None:
    """Two batches first, then one epoch (tiny_tree's 160 training images: 5 batches of 32),
    so that what slabs make ahead is what is timed and used; --loader-batches N: N."""
    args = throughput.parse_args(["--device", "cpu", "--data", str(tiny_tree), "--batch-size", "32",
                                  "--rows", "eager", *given])
    pulled, real = [], throughput.endless

    def counted(loader: loaders.Loader):
        for batch in real(loader):
            pulled.append(len(batch[1]))
            yield batch
    monkeypatch.setattr(throughput, "endless", counted)
    assert throughput.Bench(args).loader_rate(throughput.ROWS["amp"]) > 0
    assert pulled == [32] * (2 + timed)


def test_a_row_evaluates_the_first_eval_batches_only(tiny_tree: Path) -> None:
    """--eval-batches 2 of 16: the first 32 of tiny_tree's 40 test images, the very batches a
    whole pass starts with; without it, all 40 (the last batch smaller)."""
    test = loaders.build(loaders.prepare(str(tiny_tree)), loaders.Placement(torch.device("cpu")), batch_size=32,
                         eval_batch_size=16).evals["test"]
    whole, first = list(test.epoch(0)), list(throughput.FirstBatches(test, 2).epoch(0))
    assert [len(y) for _, y in whole] == [16, 16, 8] and len(first) == 2
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, whole, strict=False))
    assert [len(y) for _, y in throughput.FirstBatches(test, None).epoch(0)] == [16, 16, 8]
    assert [throughput.evaluated_images(40, n, 16) for n in (None, 1, 2, 3, 9)] == [40, 16, 32, 40, 40]


def test_every_compile_is_static(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastres import step
    from fastres.models import build_model

    seen = {}
    monkeypatch.setattr(step.torch, "compile", lambda model, **kw: seen.update(kw) or model)
    step.TrainStep(build_model("resnet8"), torch.device("cpu"), None, compile=True)
    assert seen == {"mode": None, "dynamic": False}


@pytest.mark.parametrize("argv", [
    ["--rows", "99"], ["--rows", "eager,compiled"], ["--rows", "eager,eager"], ["--rows", ""],
    ["--models", "resnet21"], ["--models", "resnet20,"], ["--models", "resnet20,resnet20"],
    ["--steps", "0"], ["--steps", "many"], ["--batch-size", "0"], ["--repeats", "0"], ["--warmup", "-1"],
    ["--loader-batches", "0"],
    ["--eval-batch", "0"], ["--eval-batches", "0"], ["--budget-s", "-1"], ["--budget-s", "nan"],
    ["--device", "tpu"], ["--data", "nowhere"],
])
def test_a_bad_value_is_one_line_and_exit_2_before_any_work(argv: list[str], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out" / "bench.json"
    device = [] if "--device" in argv else ["--device", "cpu"]
    assert run_main(throughput.main, [*device, "--data", str(tmp_path), *argv, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("fastres: error: ") and captured.err.count("\n") == 1, captured.err
    assert captured.out == "" and not out.parent.exists()


def test_a_batch_the_training_images_cannot_fill_is_one_line(micro_tree: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    """micro_tree's 20 training images make no batch of 32 (the baseline's DataLoader drops a
    partial batch: it would yield nothing, forever)."""
    out = tmp_path / "out" / "bench.json"
    argv = ["--device", "cpu", "--data", str(micro_tree), "--rows", "baseline", "--batch-size", "32", "--out", str(out)]
    loaders._prepare.cache_clear()  # decoded here (this test's own disk cache), and said so: plain lines, no tty
    assert run_main(throughput.main, argv) == 2
    captured = capsys.readouterr()
    assert captured.err == "fastres: error: 20 training images make no batch of 32: use a smaller --batch-size\n"
    said = captured.out.splitlines()
    assert said[0] == f"fastres: decoding the train and test images of {micro_tree} (once: the decoded copy is cached)"
    assert said[1].startswith("fastres: decoded 30 images in ")
    assert not out.parent.exists()


def test_an_unwritable_out_is_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_main(throughput.main, ["--device", "cpu", "--data", str(tmp_path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastres: error: --out ") and err.count("\n") == 1


def test_rows_are_named_and_help_lists_them(capsys: pytest.CaptureFixture) -> None:
    args = throughput.parse_args(["--device", "cpu", "--rows", "compile,baseline,fused-x2"])
    assert args.rows == ["compile", "baseline", "fused-x2"]
    with pytest.raises(SystemExit):
        throughput.parse_args(["--help"])
    usage = capsys.readouterr().out
    for setup in throughput.MATRIX:
        assert f"{setup.tag} " in usage
    assert "--setups" not in usage


def test_quick_says_what_it_sets_and_leaves_what_is_given(capsys: pytest.CaptureFixture) -> None:
    args = throughput.parse_args(["--device", "cpu", "--quick"])
    note = capsys.readouterr().out
    assert note.count("\n") == 1 and "--quick" in note
    for flag, value in (("--warmup", 2), ("--steps", 5), ("--repeats", 3), ("--loader-batches", 5)):
        assert f"{flag} {value}" in note
    assert "resnet20" in note and "fused-x8" in note
    assert (args.steps, args.repeats, args.models) == (5, 3, ["resnet20"]) and "fused-x8" not in args.rows
    args = throughput.parse_args(["--device", "cpu", "--quick", "--steps", "7", "--models", "resnet8"])
    note = capsys.readouterr().out
    assert args.steps == 7 and args.repeats == 3 and args.models == ["resnet8"]
    assert "--steps" not in note and "--models" not in note and "--repeats 3" in note
    throughput.parse_args(["--device", "cpu"])
    assert capsys.readouterr().out == ""  # no --quick, nothing to say
    throughput.parse_args(["--device", "cpu", "--quick", "--loaders", ""])
    assert "--loader-batches" not in capsys.readouterr().out  # no loader is timed alone


def table_row(model: str, tag: str, repeats: tuple[float, float] = (1.0, 1.1)) -> dict:
    """A measured row as the harness records it, with made-up rates (nothing is timed)."""
    setup = next(s for s in throughput.MATRIX if s.tag == tag)
    return {"model": model, **dataclasses.asdict(setup), "precision": "fp32", "it_s": sum(repeats) / 2,
            "it_s_min": min(repeats), "it_s_max": max(repeats), "speedup": None, "first_steps_s": 1.0}


def printed_rows(text: str) -> list[tuple[str, str]]:
    """(model, configuration) of each line of the printed table (printed wide: no cell wraps)."""
    names = sorted((s.name for s in throughput.MATRIX), key=len, reverse=True)
    found = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 3 and cells[2] in names:
            found.append((cells[1], cells[2]))
    return found


def table_result(models: list[str], rows: list[dict], batch_size: int = 128) -> dict:
    """A benchmark's result as `print_table` reads it, with these rows."""
    return {"device": "cpu", "batch_size": batch_size, "args": {"models": models}, "rows": rows, "loaders": {}}


def test_the_table_lists_rows_in_the_matrix_order_whatever_order_they_ran_in(capsys: pytest.CaptureFixture,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # rich's width: every configuration on one line
    models = ["resnet20", "resnet56"]
    ran = [table_row(m, t) for m, t in [("resnet20", "baseline"), ("resnet20", "compile"), ("resnet56", "baseline"),
                                        ("resnet56", "compile"), ("resnet20", "eager"), ("resnet56", "eager")]]
    throughput.print_table(table_result(models, ran))
    name = {s.tag: s.name for s in throughput.MATRIX}
    assert printed_rows(capsys.readouterr().out) == [(m, name[t]) for m in models for t in ("baseline", "eager",
                                                                                          "compile")]


def test_the_table_prints_the_trainers_precision_names_and_its_batch(capsys: pytest.CaptureFixture) -> None:
    rows = [table_row("resnet20", "baseline"), {**table_row("resnet20", "amp"), "precision": "bf16"}]
    throughput.print_table(table_result(["resnet20"], rows, batch_size=32))
    text = capsys.readouterr().out
    assert "bf16" in text and "fp32" in text and "float32" not in text and "bfloat16" not in text
    assert "fastres throughput, batch 32, cpu" in text


def test_the_table_leaves_out_the_columns_no_row_has_a_figure_in(capsys: pytest.CaptureFixture,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU run has no kernels, GPU time nor memory, and rows without fusion no fused
    figures: those columns go; the host ops per step, measured everywhere, stay."""
    monkeypatch.setenv("COLUMNS", "300")  # rich's width: no cell wraps

    def header(rows: list[dict]) -> list[str]:
        throughput.print_table(table_result(["resnet20"], rows))
        line = next(line for line in capsys.readouterr().out.splitlines() if "configuration" in line)
        return [c.strip() for c in line.split("┃")[1:-1]]

    cpu = {**table_row("resnet20", "compile"), "cpu_ops_per_step": 1102.0, "kernels_per_step": None}
    assert header([cpu]) == ["model", "configuration", "precision", "it/s (median)", "spread", "host ops/step",
                             "warm-up s"]
    gpu = {**table_row("resnet20", "eager"), "kernels_per_step": 412.0, "gpu_ms_per_step": 0.9, "peak_mem_mib": 80.5}
    assert {"kernels/step", "GPU ms/step", "peak MiB"} <= set(header([cpu, gpu]))


def test_a_wide_spread_is_named_under_the_table(capsys: pytest.CaptureFixture) -> None:
    rows = [table_row("resnet20", "baseline"), table_row("resnet20", "eager", (1.0, 1.6)),
            table_row("resnet56", "amp", (0.2, 1.6))]
    throughput.print_table(table_result(["resnet20", "resnet56"], rows))
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "resnet20 eager" in warnings[0] and "resnet56 amp" in warnings[0]
    assert "baseline" not in warnings[0]
    throughput.print_table(table_result(["resnet20"], rows[:1]))
    assert "warning:" not in capsys.readouterr().out


def test_the_loaders_table_is_printed_only_with_loaders_and_a_target_not_checked_says_why(
        capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # rich's width: no cell wraps
    checked = {**table_row("resnet20", "compile"), "target": {"figure": "it_s", "min": 1000.0}, "meets_target": True}
    throughput.print_table(table_result(["resnet20"], [checked]))
    text = capsys.readouterr().out
    assert ">=1000 it/s: yes" in text and "target ?" not in text and "loaders alone" not in text
    throughput.print_table({**table_result(["resnet20"], [{**checked, "meets_target": None}]),
                            "loaders": {"compile": 1234.0}})
    lines = capsys.readouterr().out.splitlines()
    assert ">=1000 it/s: ?" in "\n".join(lines) and "loaders alone" in "\n".join(lines)
    assert [line for line in lines if line.startswith("target ?")] == [
        "target ?: not checked; the targets are for one GPU at batch 128 (docs/benchmarks.md)"]


def test_every_measured_row_has_its_profile_and_target_fields(bench_run: dict) -> None:
    for row in (r for r in bench_run["result"]["rows"] if "it_s" in r):
        assert row["cpu_ms_per_step"] > 0 and row["cpu_ops_per_step"] > 0 and row["profile_steps"] == 1
        assert row["kernels_per_step"] is None and row["gpu_ms_per_step"] is None and row["kernels_note"]
        assert row["target"] is None and row["meets_target"] is None and row["seconds"] > 0


@pytest.mark.parametrize(("device", "it_s", "met"),
                         [("cuda", 1200.0, True), ("cuda", 900.0, False), ("cpu", 9.9, None)])
def test_a_target_is_checked_on_a_gpu_only_at_the_papers_batch(device: str, it_s: float, met: bool | None) -> None:
    row = {"tag": "compile", "it_s": it_s}
    assert throughput.target("resnet20", row, torch.device(device), 128) == {
        "target": {"figure": "it_s", "min": 1000.0}, "meets_target": met}
    assert throughput.target("resnet20", row, torch.device(device), 32)["meets_target"] is None  # another batch
    assert throughput.target("resnet8", row, torch.device("cuda"), 128) == {"target": None, "meets_target": None}
    fused = {"tag": "fused-x8", "it_s": 50.0, "fused_speedup": 3.5}
    assert throughput.target("resnet20", fused, torch.device("cuda"), 128)["meets_target"] is True


def test_loaders_alone_are_chosen_by_their_rows_names() -> None:
    args = throughput.parse_args(["--device", "cpu", "--loaders", "baseline,host"])
    assert args.loaders == ["baseline", "host"]
    assert throughput.parse_args(["--device", "cpu", "--loaders", ""]).loaders == []
    assert run_main(throughput.main, ["--device", "cpu", "--loaders", "compile"]) == 2
