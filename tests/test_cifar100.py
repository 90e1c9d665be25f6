"""CIFAR-100: its official archive and extracted folder, image trees of its 100 fine classes,
100-way models, and a one-line error wherever the two data sets are mixed up."""

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastres.cli import run_main
from fastres.data import sources
from fastres.data.dataset import CIFAR100
from fastres.evaluate import main as evaluate_main
from fastres.export import main as export_main
from fastres.models import build_model, count_parameters
from fastres.train import main as train_main


def images_for(labels: np.ndarray, seed: int) -> np.ndarray:
    """Each class its own colour, plus noise (learnable, like conftest's CIFAR-10 images)."""
    colours = np.random.default_rng(99).integers(0, 256, (100, 3))
    noise = np.random.default_rng(seed).normal(0, 30, (len(labels), 32, 32, 3))
    return np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)


def write_archive(path: Path, drop_class: int | None = None) -> tuple[Path, np.ndarray]:
    """A small archive in the official CIFAR-100 python format: `train` and `test` pickles
    with fine and coarse labels, one training and one test image per class."""
    labels = np.array([c for c in range(100) if c != drop_class])
    train = images_for(labels, 1)
    with tarfile.open(path, "w:gz") as tar:
        for name, imgs in (("train", train), ("test", images_for(np.arange(100), 2))):
            lab = labels if name == "train" else np.arange(100)
            data = pickle.dumps({b"filenames": [], b"batch_label": b"x", b"fine_labels": lab.tolist(),
                                 b"coarse_labels": (lab // 5).tolist(),
                                 b"data": imgs.transpose(0, 3, 1, 2).reshape(len(imgs), -1)})
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path, train


def write_tree(root: Path, per_class: int = 2) -> Path:
    for split, n, seed in (("train", per_class, 3), ("test", 1, 4)):
        labels = np.repeat(np.arange(100), n)
        for k, (img, label) in enumerate(zip(images_for(labels, seed), labels, strict=True)):
            folder = root / split / CIFAR100.classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{k:05d}.png")
    return root


def test_hundred_way_models_count_their_parameters() -> None:
    assert count_parameters(build_model("resnet20", num_classes=100)) == 275_572  # 269,722 + 64*90 + 90
    assert count_parameters(build_model("resnet56", num_classes=100)) == 858_868
    assert count_parameters(build_model("resnet8", num_classes=100)) == 81_140


def test_the_official_archive_and_its_extracted_folder(tmp_path: Path) -> None:
    path, train = write_archive(tmp_path / "tiny-cifar100.tar.gz")
    splits = sources.load(sources.resolve(path, dataset="cifar100"), tmp_path / "c1")
    assert np.array_equal(splits.train.images, train) and splits.train.labels.tolist() == list(range(100))
    assert len(splits.test) == 100
    with tarfile.open(path) as tar:
        tar.extractall(tmp_path / "root", filter="data")
    folder = tmp_path / "root" / "cifar-100-python"
    with pytest.MonkeyPatch.context() as m:
        for f in folder.iterdir():
            m.setitem(CIFAR100.file_md5, f.name, __import__("hashlib").md5(f.read_bytes()).hexdigest())
        again = sources.load(sources.resolve(tmp_path / "root", dataset="cifar100"), tmp_path / "c2")
    assert np.array_equal(again.train.images, train)


@pytest.mark.parametrize("case", ["wrong md5", "truncated", "missing class", "other data set"])
def test_bad_cifar100_data_is_one_line(tmp_path: Path, case: str, capsys: pytest.CaptureFixture) -> None:
    if case == "wrong md5":  # the official name is held to the published md5
        path, _ = write_archive(tmp_path / "cifar-100-python.tar.gz")
        argv, expect = ["--dataset", "cifar100"], "does not match the expected eb9058c3a382ffc7106e4002c42a8d85"
    elif case == "truncated":
        path, _ = write_archive(tmp_path / "tiny.tar.gz")
        path.write_bytes(path.read_bytes()[:300])
        argv, expect = ["--dataset", "cifar100"], "truncated or corrupt"
    elif case == "missing class":
        path, _ = write_archive(tmp_path / "tiny.tar.gz", drop_class=57)
        argv, expect = ["--dataset", "cifar100"], f"train: no images of class {CIFAR100.classes[57]}"
    else:  # a CIFAR-100 archive for a CIFAR-10 run
        path, _ = write_archive(tmp_path / "tiny.tar.gz")
        argv, expect = [], "holds cifar100, not cifar10: pass --dataset cifar100"
    assert run_main(train_main, ["resnet8", "--data", str(path), "--out", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expect in err and not (tmp_path / "run").exists()


def test_training_evaluating_and_exporting_on_cifar100(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tree = write_tree(tmp_path / "tree")
    run = tmp_path / "run"
    argv = ["resnet8", "--dataset", "cifar100", "--data", str(tree), "--iters", "6", "--batch-size", "16",
            "--eval-every", "6", "--out", str(run), "--device", "cpu", "--progress", "none"]
    assert run_main(train_main, argv) == 0
    results = json.loads((run / "results.json").read_text())
    assert (results["dataset"], results["params"], results["config"]["dataset"]) == ("cifar100", 81_140, "cifar100")
    assert run_main(evaluate_main, [str(run), "--json", str(tmp_path / "e.json")]) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["dataset"] == "cifar100" and len(report["test"]["per_class"]) == 100
    assert report["test"]["error"] == pytest.approx(results["test_error"])
    assert run_main(export_main, [str(run), str(tmp_path / "w.pt")]) == 0
    meta = json.loads((tmp_path / "w.json").read_text())
    assert meta["num_classes"] == 100 and meta["classes"][0] == "apple" and meta["dataset"] == "cifar100"
    # a CIFAR-100 model against CIFAR-10 data, and the reverse: one line each
    capsys.readouterr()
    cifar10_tree = tmp_path / "c10"
    from conftest import write_tree as write_cifar10_tree
    write_cifar10_tree(cifar10_tree, {"train": 2, "test": 1})
    assert run_main(evaluate_main, [str(run), "--data", str(cifar10_tree)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown class 'airplane'" in err and "expected the 100 classes" in err
