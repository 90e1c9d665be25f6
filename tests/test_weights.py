"""Trained weights out and in: export, strict loading, preprocessing, evaluation."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fifo_writer, tiny_config

from fastres import rundir
from fastres.cli import run_main
from fastres.data import loaders
from fastres.errors import RunError
from fastres.evaluate import main as evaluate_main
from fastres.export import main as export_main
from fastres.train import train
from fastres.weights import WithPreprocessing, load_model


@pytest.fixture(scope="module")
def trained(tiny_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("weights") / "run"
    return run, train(tiny_config(tiny_tree, run, iters=10, eval_every=10))


def test_export_round_trip_gives_bit_identical_logits(trained: tuple[Path, dict], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    run, results = trained
    out = tmp_path / "resnet8.pt"
    assert run_main(export_main, [str(run), str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert (meta["model"], meta["shortcut"], meta["step"], meta["classes"][3]) == ("resnet8", "A", 10, "cat")
    assert meta["test_error"] == results["test_error"]
    assert set(torch.load(out, weights_only=True)) == set(rundir.read_checkpoint(run).model)
    x = torch.randn(4, 3, 32, 32)
    a, b = load_model(out).eval(), load_model(run).eval()
    assert torch.equal(a(x), b(x))


def test_evaluating_exported_weights_matches_the_run(trained: tuple[Path, dict], tmp_path: Path, tiny_tree: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    run, results = trained
    out = tmp_path / "w.pt"
    run_main(export_main, [str(run), str(out)])
    capsys.readouterr()
    assert run_main(evaluate_main, [str(out), "--data", str(tiny_tree)]) == 0
    assert f"test error {100 * results['test_error']:.2f}%" in capsys.readouterr().out


@pytest.mark.parametrize(("break_it", "message"), [
    (lambda sd: sd.pop("fc.bias"), "no weights for 'fc.bias'"),
    (lambda sd: sd.__setitem__("fc.weight", torch.zeros(100, 64)), "'fc.weight' has shape (100, 64), the model needs"),
    (lambda sd: sd.__setitem__("head.extra", torch.zeros(1)), "weights for 'head.extra', which the model does not"),
])
def test_strict_loading_names_the_first_mismatch(trained: tuple[Path, dict], tmp_path: Path, break_it,
                                                 message: str, capsys: pytest.CaptureFixture) -> None:
    run, _ = trained
    out = tmp_path / "w.pt"
    run_main(export_main, [str(run), str(out)])
    sd = torch.load(out, weights_only=True)
    break_it(sd)
    torch.save(sd, out)
    assert run_main(evaluate_main, [str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_weights_of_another_model_are_refused(trained: tuple[Path, dict]) -> None:
    run, _ = trained
    with pytest.raises(RunError, match="holds resnet8-A weights, not resnet8-B"):
        load_model(run, "resnet8", "B")
    with pytest.raises(RunError, match="no weights there"):
        load_model(run / "nothing.pt")


def test_the_model_comes_with_its_preprocessing(trained: tuple[Path, dict], tiny_tree: Path) -> None:
    """uint8 images through the wrapper give the logits of the loader's normalised batch, bit
    for bit: the same normalisation arithmetic, the same layout, the same model."""
    run, _ = trained
    state = rundir.read_checkpoint(run)
    norm = state.normalization
    model = load_model(run).eval()
    wrapped = WithPreprocessing(model, norm.mean, norm.std).eval()
    test = loaders.prepare(str(tiny_tree)).splits.test
    data = loaders.build_evals(loaders.prepare(str(tiny_tree)), loaders.Placement(torch.device("cpu")),
                               mean=norm.mean.numpy(), std=norm.std.numpy(), eval_batch_size=8)
    x, _ = next(data["test"].epoch(0))
    with torch.no_grad():
        assert torch.equal(wrapped(torch.from_numpy(np.asarray(test.images[:8]))), model(x))
    with pytest.raises(ValueError, match="expected uint8 images"):
        wrapped(x)


def test_evaluate_per_class_table_and_json(trained: tuple[Path, dict], tiny_tree: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    """The per-class errors add up to the overall error the run itself reported."""
    run, results = trained
    out = tmp_path / "eval.json"
    assert run_main(evaluate_main, [str(run), "--per-class", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "test error per class" in printed and "airplane" in printed
    report = json.loads(out.read_text())
    per_class = report["test"]["per_class"]
    assert list(per_class)[:2] == ["airplane", "automobile"] and report["test"]["images"] == 40
    assert sum(e * 4 for e in per_class.values()) / 40 == pytest.approx(results["test_error"])
    assert report["test"]["error"] == pytest.approx(results["test_error"])


def test_predict_gives_the_models_own_top_classes(trained: tuple[Path, dict], tiny_tree: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    from fastres.predict import main as predict_main

    run, _ = trained
    files = sorted((tiny_tree / "test" / "cat").iterdir())[:2]
    big = tmp_path / "big.png"
    Image.open(files[0]).resize((64, 64)).save(big)
    assert run_main(predict_main, [str(run), *map(str, files), str(big), "--json", "--top", "3"]) == 0
    out = capsys.readouterr()
    results = json.loads(out.out)
    assert "big.png: resized from 64x64 to 32x32" in out.err
    state = rundir.read_checkpoint(run)
    model = load_model(run).eval()
    mean, std = state.normalization.mean, state.normalization.std
    for r, f in zip(results, files, strict=False):
        x = (torch.from_numpy(np.array(Image.open(f).convert("RGB"))).float() / 255 - mean) / std
        with torch.no_grad():
            probs = model(x.permute(2, 0, 1)[None]).softmax(1)[0]
        top = [t["probability"] for t in r["top"]]
        assert r["top"][0]["class"] == loaders_classes()[int(probs.argmax())] and top == sorted(top, reverse=True)
        assert top[0] == pytest.approx(float(probs.max()), abs=1e-6)
    bad = tmp_path / "fake.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    assert run_main(predict_main, [str(run), str(files[0]), str(bad)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1 and "fake.png: cannot read image" in out.err


def test_predict_refuses_an_image_over_its_pixel_bound_from_the_header(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image, ImageFile

    from fastres.errors import DataError
    from fastres.predict import MAX_FILE_BYTES, read_image

    big = tmp_path / "big.png"
    Image.new("1", (5000, 5000)).save(big)  # 25 Mpixel in a few KB
    for cls, method in ((ImageFile.ImageFile, "load"), (Image.Image, "load"), (Image.Image, "convert")):
        monkeypatch.setattr(cls, method, lambda *a, **k: pytest.fail("decoded a huge image"))
    with pytest.raises(DataError, match="big.png: image is 5000x5000, over the 16,777,216 pixels"):
        read_image(big)
    os.truncate(big, MAX_FILE_BYTES + 1)  # sparse: by stat alone it is too big to be such an image
    with pytest.raises(DataError, match=f"big.png: {MAX_FILE_BYTES + 1:,} bytes, over the bound"):
        read_image(big)


def test_predict_refuses_a_fifo_without_opening_it(trained: tuple[Path, dict], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    import builtins

    from fastres.predict import main as predict_main

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    real = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: pytest.fail("opened") if f == fifo else real(f, *a, **k))
    with fifo_writer(fifo):
        assert run_main(predict_main, [str(trained[0]), str(fifo)]) == 2
    err = capsys.readouterr().err
    assert err == f"fastres: error: {fifo}: is a FIFO, not an image file\n"


def loaders_classes() -> tuple[str, ...]:
    from fastres.data.dataset import CLASSES

    return CLASSES


def test_an_export_naming_a_model_that_cannot_fit_is_one_line(trained: tuple[Path, dict], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A few KB of JSON naming resnet2000000 (32 billion parameters): refused from the depth,
    before anything is allocated."""
    from fastres import models

    run, _ = trained
    out = tmp_path / "w.pt"
    assert run_main(export_main, [str(run), str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    out.with_suffix(".json").write_text(json.dumps({**meta, "model": "resnet2000000"}))
    monkeypatch.setattr(models, "CifarResNet", lambda *a: pytest.fail("built a model that cannot fit"))
    capsys.readouterr()
    assert run_main(evaluate_main, [str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "resnet2000000 (32,405,279,002 parameters) needs at least" in err
