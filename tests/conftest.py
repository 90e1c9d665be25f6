"""Shared fixtures: tiny CIFAR-10 datasets in every supported format, built by the tests."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import pickle
import signal
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

# One CPU thread per test process, before torch is imported: pytest-xdist runs one worker per
# core, and the runs a test compares bit for bit (in-process and in subprocesses, which
# inherit this) must sum in the same order, which the thread count decides.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image

from fastres.config import RunConfig
from fastres.data.dataset import CLASSES, Split

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="run slow real-data tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: opt in with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep every test's decoded-data cache out of the user's home."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("FASTRES_CACHE", str(cache))
    return cache


def class_images(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable images: each class has its own colour, plus noise."""
    rng = np.random.default_rng(seed)
    colours = np.random.default_rng(1234).integers(0, 256, (len(CLASSES), 3))
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    noise = rng.normal(0, 40, (len(labels), 32, 32, 3))
    images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return images, labels


def write_tree(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """`root/train/<class>/*.png` and `root/test/<class>/*.png`, lossless so pixels are exact."""
    for i, (split, n) in enumerate(per_class.items()):
        images, labels = class_images(n, seed + i)
        for k, (img, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{k:05d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 classes: 16 training and 4 test images each."""
    return write_tree(tmp_path_factory.mktemp("tree"), {"train": 16, "test": 4})


@pytest.fixture(scope="session")
def small_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 classes: 8 training and 4 test images each, for the float64 trajectories (ATen's
    float64 convolutions cost about 4x fp32's): 20 steps of 8 images are 2 epochs."""
    return write_tree(tmp_path_factory.mktemp("small"), {"train": 8, "test": 4})


@pytest.fixture(scope="session")
def micro_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 classes: 2 training and 1 test image each, for what is slow per image (fp16 on a
    CPU: about 0.1 s an image forward, ATen's reference convolution)."""
    return write_tree(tmp_path_factory.mktemp("micro"), {"train": 2, "test": 1})


@contextlib.contextmanager
def fifo_writer(path: Path) -> Iterator[None]:
    """A writer at a FIFO's other end, so that code which wrongly opens it reads an empty file
    and fails its test, instead of hanging the suite; released when the block ends."""
    # os.open, not open(): tests watch what open() is called with
    writer = threading.Thread(target=lambda: os.close(os.open(path, os.O_WRONLY)), daemon=True)
    writer.start()
    try:
        yield
    finally:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # lets a writer still waiting go
        writer.join(10)
        os.close(fd)


def official_batch(images: np.ndarray, labels: np.ndarray) -> bytes:
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return pickle.dumps({b"batch_label": b"x", b"labels": labels.tolist(), b"data": rows, b"filenames": []})


def write_official(path: Path, per_batch: int = 10, drop: str | None = None) -> tuple[Path, np.ndarray]:
    """A small archive in the official python format: 5 training batches and a test batch.
    Returns the path and all training images in batch order."""
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    train = []
    with tarfile.open(path, "w:gz") as tar:
        for i, name in enumerate(names):
            images, labels = class_images(per_batch // 10, seed=100 + i)
            if name != "test_batch":
                train.append(images)
            if name == drop:
                continue
            data = official_batch(images, labels)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path, np.concatenate(train)


@pytest.fixture(scope="session")
def tiny_official(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_official(tmp_path_factory.mktemp("official") / "tiny-cifar-python.tar.gz")[0]


def subprocess_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ, FASTRES_CACHE=str(cache))
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    return env


def coordinate_images(n: int) -> Split:
    """Channel 0 holds each pixel's row, channel 1 its column (both + 100); the label is the
    image's index, so batches can be traced back to images."""
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    img = np.zeros((n, 32, 32, 3), np.uint8)
    img[..., 0] = rows + 100
    img[..., 1] = cols + 100
    return Split(img, np.arange(n))


def decode(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Recover (dy, dx, flip) of each output image from the coordinates at its centre."""
    px = torch.round(x * 255).to(torch.int64)
    r, c0, c1 = px[:, 0, 16, 16] - 100, px[:, 1, 16, 16] - 100, px[:, 1, 16, 17] - 100
    flip = c1 < c0
    dx = torch.where(flip, c0 - 15, c0 - 16)
    return (r - 16).numpy(), dx.numpy(), flip.numpy()


DETERMINISTIC = ("iter", "epoch", "lr", "train_loss", "train_error", "test_error", "val_error")


def tiny_config(data: Path, out: Path, **kw) -> RunConfig:
    base = dict(model="resnet8", shortcut="A", iters=30, milestones=(15, 25), batch_size=16, data=str(data),
                log_every=5, eval_every=10, checkpoint_every=10, out=str(out), progress="none", device="cpu")
    return RunConfig(**{**base, **kw})


@pytest.fixture(scope="session")
def tiny_reference(tiny_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The unbroken run of `tiny_config` (its directory and results), trained once per test
    process: the run whose directory test_train checks, and the reference of the resumes in
    test_train and test_reliability. Tests that take it are put in test_reliability's xdist
    group, so that one process of the suite trains it. Read it; never write into it."""
    from fastres.train import train

    run = tmp_path_factory.mktemp("tiny-reference") / "run"
    return run, train(tiny_config(tiny_tree, run))


def deterministic(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k in DETERMINISTIC} for m in metrics]


class Forked:
    """A second process forked from this test process, in place of a fresh interpreter
    started to run fastres: on the 2-core machine of this project a fresh interpreter spends
    about 4 core-seconds importing torch before it does anything, and the tests that need a
    second process (a signal, a kill -9, a lock held elsewhere) need its own pid, its own
    file descriptions and its own fate, not a fresh import. The child starts as a fresh
    interpreter would: default SIGINT and SIGTERM handlers, its own stdout and stderr (files,
    UTF-8, buffered as a fresh interpreter's are when not a terminal; `stdout_errors` is what
    PYTHONIOENCODING would set), the environment updated by `env`,
    and its exit status that of `target()` (an exception: its traceback and status 1). Its
    exit skips this process's cleanup (os._exit). Read it as a subprocess.Popen: `pid`,
    `poll`, `wait`, `send_signal`, `kill`, `returncode` (-N when killed by signal N), then
    `stdout` and `stderr` once it has ended. `share` is another Forked whose stdout and
    stderr this one writes too (torchrun's workers write into one pair of streams)."""

    def __init__(self, target: Callable[[], int | None], env: dict[str, str] | None = None,
                 stdout_errors: str = "strict", share: Forked | None = None) -> None:
        if share is None:  # O_APPEND: writes of several processes land whole, one after another
            self._files = [tempfile.TemporaryFile(buffering=0) for _ in range(2)]
            for f in self._files:
                fcntl.fcntl(f.fileno(), fcntl.F_SETFL, fcntl.fcntl(f.fileno(), fcntl.F_GETFL) | os.O_APPEND)
        else:
            self._files = share._files
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # nothing buffered here is written twice, by the child too
        self.returncode: int | None = None
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns
            code = 1
            try:
                os.dup2(self._files[0].fileno(), 1)
                os.dup2(self._files[1].fileno(), 2)
                # as a fresh interpreter makes them (Python/pylifecycle.c, create_stdio)
                sys.stdout = sys.__stdout__ = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)),
                                                               encoding="utf-8", errors=stdout_errors)
                sys.stderr = sys.__stderr__ = io.TextIOWrapper(io.BufferedWriter(io.FileIO(2, "w", closefd=False)),
                                                               encoding="utf-8", errors="backslashreplace",
                                                               line_buffering=True)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.environ.update(env or {})
                result = target()
                code = 0 if result is None else result
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                traceback.print_exc()
            finally:
                with contextlib.suppress(BaseException):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int:
        """The exit status; a child still running after `timeout` seconds is killed and the
        test fails, instead of the suite hanging."""
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                self.wait(10)
                raise AssertionError(f"forked process {self.pid} still running after {timeout} s: killed")
            time.sleep(0.01)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _read(self, k: int) -> str:
        self._files[k].seek(0)
        return self._files[k].read().decode("utf-8", errors="backslashreplace")

    @property
    def stdout(self) -> str:
        return self._read(0)

    @property
    def stderr(self) -> str:
        return self._read(1)

    def wait_for_output(self, text: str, timeout: float) -> None:
        """Until `text` is in its stdout; fails if it ends first or takes over `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while text not in self.stdout:
            assert self.poll() is None, f"ended with {self.returncode} before printing {text!r}: {self.stderr}"
            assert time.monotonic() < deadline, f"no {text!r} after {timeout} s"
            time.sleep(0.01)


def forked_main(main: Callable[[list[str]], int], argv: list[str], **kw) -> Forked:
    """`python -m fastres.X ARGV`, forked: `main(argv)` through fastres' `run_main`, with the
    exit status it returns. torch._dynamo is imported here first: the first optimizer a
    process builds imports it (torch.optim's constructors are wrapped by dynamo's disable),
    about 3.6 core-seconds on this project's 2-core machine, which this process pays once
    anyway when it trains in-process; the children inherit it instead of paying it each."""
    import torch._dynamo  # noqa: F401

    from fastres.cli import run_main

    return Forked(lambda: run_main(main, argv), **kw)


@contextlib.contextmanager
def lock_held_elsewhere(run: Path) -> Iterator[Forked]:
    """Another process holds the run directory's lock (a `fastres.rundir.RunLock`) until the
    block ends, when it is killed -9: its lock file stays, its flock goes with it."""
    from fastres.rundir import RunLock

    def hold() -> None:
        with RunLock(run):
            print("held", flush=True)
            time.sleep(600)

    holder = Forked(hold)
    try:
        holder.wait_for_output("held", 60)
        yield holder
    finally:
        holder.kill()
        holder.wait(10)
