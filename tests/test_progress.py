"""The progress display: the bar's line at 80 columns, the early reads before the first log
point (shown, never logged), the smoothed time remaining, the start's summary, the resume
line and the decoding bar."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import deterministic, tiny_config
from rich.console import Console

from fastres import progress, rundir
from fastres.data import images
from fastres.distributed import DistInfo
from fastres.metrics import Window
from fastres.progress import Reporter
from fastres.train import main as train_main
from fastres.train import train

RECORD = {"iter": 12345, "lr": 0.001, "train_loss": 0.012345, "train_error": 0.0042, "val_error": 0.0712,
          "test_error": 0.0697, "it_s": 1234.5}


class FakeTime:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def final_screen(width: int, total: int, done: int, title: str, records: list[dict], labels: list[str]) -> list[str]:
    """The bar's lines on a terminal of `width` columns, 1000 steps after the start, at a
    log point 10 s later (100 it/s)."""
    clock = FakeTime()
    reporter = Reporter("rich", total, done - 1000, title, console=Console(width=width, file=io.StringIO()),
                        now=clock)
    for _ in range(1000):
        reporter.advance()
    clock.t = 10.0
    reporter.log(records, labels)
    reporter.close()
    screen = Console(width=width, record=True, file=io.StringIO())
    screen.print(reporter.bar)
    return screen.export_text().splitlines()


def test_the_bar_fits_80_columns_dropping_figures_before_the_count_or_the_time() -> None:
    [line] = final_screen(80, 64000, 12345, "resnet1202", [RECORD], ["s0"])
    assert len(line) <= 78 and "12345/64000" in line and line.endswith("0:08:37")  # 51655 to go at 100 it/s
    assert all(f in line for f in ("loss 0.0123", "test 6.97%", "1234.5 it/s"))  # the most useful stay
    assert all(f not in line for f in ("lr 0.001", "err 0.42%", "val 7.12%"))
    [wide] = final_screen(200, 64000, 12345, "resnet1202", [RECORD], ["s0"])
    assert all(f in wide for f in ("lr 0.001", "err 0.42%", "val 7.12%", "test 6.97%"))


@pytest.mark.parametrize("width", [24, 30, 40, 60, 80, 100, 120])
def test_the_count_and_the_time_are_never_cut(width: int) -> None:
    records = [dict(RECORD, train_loss=RECORD["train_loss"] + k) for k in range(4)]
    [line] = final_screen(width, 64000, 12345, "resnet110-B x4", records, ["s0", "s1", "s2", "s3"])
    assert len(line) <= width - 2 and "12345/64000" in line and line.endswith("0:08:37"), line
    if width == 100:  # the group's it/s and the first run stay, the others go
        assert "1234.5 it/s x4" in line and "s0 0.012/" in line and "s1 " not in line


def test_figures_are_dropped_by_rank_in_display_order() -> None:
    fields = progress.record_fields(RECORD)
    assert progress.fit(fields, 1000) == progress.format_record(RECORD)
    assert progress.fit(fields, 24) == "loss 0.0123  1234.5 it/s"
    assert progress.fit(fields, 10) == ""


def test_the_time_remaining_is_an_exponential_average_of_the_log_intervals() -> None:
    clock = FakeTime()
    reporter = Reporter("none", 1000, 0, "resnet20", now=clock)
    for done, t in ((100, 10.0), (200, 30.0), (300, 40.0)):  # 10 it/s, then 5 (an evaluation), then 10
        clock.t = t
        reporter.log([{"iter": done, "lr": 0.1}], ["s0"])
    assert reporter.rate == pytest.approx(0.2 * 10 + 0.8 * (0.2 * 5 + 0.8 * 10))
    assert reporter.remaining(300) == pytest.approx(700 / reporter.rate)
    assert progress.clock(None) == "-:--:--" and progress.clock(3725.4) == "1:02:05"


def test_early_reads_come_at_powers_of_two_until_the_first_log_point() -> None:
    fresh = Reporter("rich", 1000, 0, "resnet20", log_every=100, console=Console(file=io.StringIO()))
    resumed = Reporter("rich", 1000, 250, "resnet20", log_every=100, console=Console(file=io.StringIO()))
    plain = Reporter("plain", 1000, 0, "resnet20", log_every=100)
    try:
        assert [d for d in range(1, 1001) if fresh.wants_early(d)] == [1, 2, 4, 8, 16, 32, 64]
        assert [d for d in range(251, 1001) if resumed.wants_early(d)] == [251, 252, 254, 258, 266, 282]
        assert not any(plain.wants_early(d) for d in range(1, 100))  # plain lines are the log points alone
    finally:
        fresh.close()
        resumed.close()


def test_an_early_read_leaves_out_the_first_step_and_shows_loss_and_rate() -> None:
    clock = FakeTime()
    reporter = Reporter("rich", 100, 0, "resnet8", log_every=50, console=Console(file=io.StringIO()), now=clock)
    try:
        clock.t = 30.0  # the first step compiles
        reporter.early(1, [0.1], [{"train_loss": 2.5, "train_error": 0.9}], ["s0"])
        clock.t = 31.0
        reporter.early(2, [0.1], [{"train_loss": 2.4, "train_error": 0.875}], ["s0"])
        assert reporter.rate == 1.0
        assert progress.fit(reporter.fields, 1000) == "lr 0.1  loss 2.4000  err 87.50%  1.0 it/s"
    finally:
        reporter.close()


def test_peek_reads_the_window_without_resetting_it() -> None:
    window = Window(torch.device("cpu"), batch_size=4)
    window.add(torch.tensor([2.0], dtype=torch.float64), torch.tensor([1]))
    window.add(torch.tensor([1.0], dtype=torch.float64), torch.tensor([3]))
    dist = DistInfo()
    assert window.peek(dist) == [{"train_loss": 1.5, "train_error": 0.5}]
    assert window.read(dist) == [{"train_loss": 1.5, "train_error": 0.5}]  # the same figures, still there


def test_a_run_with_early_reads_logs_exactly_what_a_run_without_them_logs(
        tiny_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    peeks = []
    real_peek = Window.peek
    monkeypatch.setattr(Window, "peek", lambda self, dist: peeks.append(self.steps) or real_peek(self, dist))
    kw = dict(iters=8, milestones=(4, 6), eval_every=8, log_every=5)
    train(tiny_config(tiny_tree, tmp_path / "bar", progress="rich", **kw))
    assert peeks == [1, 2, 4]
    train(tiny_config(tiny_tree, tmp_path / "none", **kw))
    assert peeks == [1, 2, 4]  # no display, no early read
    a, b = (rundir.MetricsLog(tmp_path / d).read() for d in ("bar", "none"))
    assert deterministic(a) == deterministic(b) and [r["iter"] for r in a] == [5, 8]


def test_the_start_is_a_short_summary_and_a_resume_says_where_it_goes_on(
        tiny_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert train(tiny_config(tiny_tree, run, iters=4, eval_every=4, progress="plain"), stop_at=2) is None
    start = capsys.readouterr().out.split("\niter ")[0].splitlines()
    if start[0].startswith("fastres: decoding "):  # this test's fresh cache: the data decoded first, in 2 lines
        assert start[1].startswith("fastres: decoded 200 images")
        start = start[2:]
    assert start[0] == "fastres: resnet8-A, 75,290 parameters" and len(start) <= 6
    facts = dict(line.split(None, 1) for line in start[1:])
    assert facts["data"].startswith(f"images: {tiny_tree}") and "160 training images" in facts["data"]
    assert "(1 threads)" in facts["device"] and facts["device"].endswith("; fp32")
    assert facts["schedule"] == "4 iterations, lr /10 at 15, 25 (from 0.1); batch 16"
    assert facts["config"] == str(run / rundir.CONFIG)
    assert json.loads((run / rundir.CONFIG).read_text())["model"] == "resnet8"  # the full config, in its file
    assert train_main(["--resume", str(run), "--progress", "plain"]) == 0
    out = capsys.readouterr().out
    assert "fastres: resuming from iteration 2 of 4\n" in out and '"model"' not in out


def test_decoding_shows_a_bar_of_the_images(tiny_tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.progress import Progress

    tasks, real_add = [], Progress.add_task
    monkeypatch.setattr(Progress, "add_task", lambda self, name, total=None, **kw:
                        tasks.append((name, total)) or real_add(self, name, total=total, **kw))
    shown = images.read_decoded([tiny_tree], progress="rich")
    assert tasks == [("decoding train and test images", 200)]
    quiet = images.read_decoded([tiny_tree])
    assert len(tasks) == 1 and np.array_equal(shown.train.images, quiet.train.images)


def test_decoding_in_plain_logs_is_a_line_at_its_start_and_one_at_its_end(tiny_tree: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    """Without a bar (`--progress plain`), the first run's wait for the decoding is said, not
    silent; without progress, nothing is printed."""
    capsys.readouterr()
    images.read_decoded([tiny_tree], progress="plain")
    start, end = capsys.readouterr().out.splitlines()
    assert start == f"fastres: decoding the train and test images of {tiny_tree} (once: the decoded copy is cached)"
    assert end.startswith("fastres: decoded 200 images in ") and end.endswith(" s")
    images.read_decoded([tiny_tree], progress="none")
    assert capsys.readouterr().out == ""
    with pytest.raises(ValueError, match="progress must be rich, plain or none"):
        images.read_decoded([tiny_tree], progress=True)


def test_a_prepared_dataset_is_reused_whatever_its_progress(tiny_tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """How decoding is shown is not part of what is prepared: a run with plain logs reuses
    what a bare prepare() made (loaded once, from the cache or the source)."""
    from fastres.data import loaders, sources

    loaders._prepare.cache_clear()
    calls, real = [], sources.load
    monkeypatch.setattr(sources, "load", lambda *a, **kw: calls.append(kw.get("progress")) or real(*a, **kw))
    first, again = loaders.prepare(str(tiny_tree)), loaders.prepare(str(tiny_tree), progress="plain")
    assert again is first and calls == ["none"]
    loaders._prepare.cache_clear()
    loaders.prepare(str(tiny_tree), progress="plain")
    assert calls == ["none", "plain"]  # a miss shows its decoding as asked


def test_evaluation_reads_the_test_split_a_training_run_decoded(tiny_tree: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """The test images a run decoded with its training images are not decoded again for its
    evaluation (a test-only read), in an image folder and in split archives; they are the very
    pixels a test-only decode gives, and the training arrays are not kept. A folder whose
    test/ is not what the whole set reads (train.tar.gz and test.tar.gz beside an extracted
    test/, which may hold other images) decodes its test/ for itself."""
    import shutil
    import tarfile

    from fastres.data import loaders

    monkeypatch.setenv("FASTRES_CACHE", str(tmp_path / "cache"))  # empty: every decode below is this test's
    only_test = tmp_path / "only-test"
    shutil.copytree(tiny_tree / "test", only_test / "test")
    archives = tmp_path / "archives"
    archives.mkdir()
    for split in ("train", "test"):
        with tarfile.open(archives / f"{split}.tar.gz", "w:gz") as tar:
            tar.add(tiny_tree / split, arcname=split)

    def prepared(data: Path, splits: tuple[str, ...]) -> tuple[loaders.Prepared, str]:
        loaders._prepare.cache_clear()
        capsys.readouterr()
        return loaders.prepare(str(data), splits=splits, progress="plain"), capsys.readouterr().out

    alone, said = prepared(only_test, ("test",))  # the test files alone: decoded for themselves
    assert said.startswith("fastres: decoding the test images of") and len(alone.splits.train) == 0
    for data in (tiny_tree, archives):
        _, said = prepared(data, ("train", "test"))
        assert said.startswith("fastres: decoding the train and test images of")
        reused, said = prepared(data, ("test",))
        assert said == "" and reused.source.splits == ("test",) and len(reused.splits.train) == 0
        assert np.array_equal(reused.splits.test.images, alone.splits.test.images)
        assert np.array_equal(reused.splits.test.labels, alone.splits.test.labels)
    other = tmp_path / "other"  # the whole set reads the archives; a test-only read, the folder test/
    shutil.copytree(archives, other)
    shutil.copytree(only_test / "test", other / "test")
    _, said = prepared(other, ("train", "test"))
    assert said.startswith(f"fastres: decoding the train and test images of {other / 'train.tar.gz'}")
    _, said = prepared(other, ("test",))
    assert said.startswith(f"fastres: decoding the test images of {other}")
    loaders._prepare.cache_clear()
