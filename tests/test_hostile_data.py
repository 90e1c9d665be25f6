"""Hostile and odd data: each case is read correctly or refused in one line, nothing is
written outside the cache and run directories, and a damaged cache is never used."""

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import class_images, write_tree
from PIL import Image

from fastres.cli import run_main
from fastres.data import images, sources
from fastres.errors import DataError
from fastres.train import main as train_main


def encode(img: Image.Image, fmt: str = "PNG") -> np.ndarray:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return np.frombuffer(buf.getvalue(), np.uint8)


def test_image_modes_convert_as_documented() -> None:
    rgb = class_images(1, seed=3)[0][0]
    gray = rgb[..., 0]
    assert np.array_equal(images.decode_file(encode(Image.fromarray(rgb))), rgb)
    assert np.array_equal(images.decode_file(encode(Image.fromarray(gray))), np.repeat(gray[..., None], 3, 2))
    rgba = np.concatenate([rgb, np.full((32, 32, 1), 7, np.uint8)], axis=2)
    assert np.array_equal(images.decode_file(encode(Image.fromarray(rgba))), rgb)  # alpha dropped
    palette = Image.fromarray(rgb).quantize(16)
    assert np.array_equal(images.decode_file(encode(palette)), np.asarray(palette.convert("RGB")))
    wide = (gray.astype(np.uint16) << 8) | 0xAB
    assert np.array_equal(images.decode_file(encode(Image.fromarray(wide))), np.repeat(gray[..., None], 3, 2))


@pytest.mark.parametrize(("data", "why"), [
    (b"", "cannot decode image"),
    (b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4, "cannot decode image"),
    (None, "DecompressionBombError"),  # 400 Mpixel in 50 KB: Pillow refuses it when opened, before decoding
])
def test_unreadable_images_are_one_line(data: bytes | None, why: str) -> None:
    if data is None:  # (a 100 Mpixel image, under Pillow's limit, is refused by size before decoding)
        buf = io.BytesIO()
        Image.new("1", (20000, 20000)).save(buf, format="PNG")  # 50 KB on disk, 400 Mpixel decoded
        data = buf.getvalue()
    with pytest.raises(DataError, match=why) as e:
        images.decode_file(np.frombuffer(data, np.uint8), "train/cat/x.png")
    assert "\n" not in str(e.value)


def tar_with(path: Path, extra: tarfile.TarInfo, payload: bytes = b"") -> Path:
    tree = write_tree(path.parent / "src", {"train": 2, "test": 1})
    with tarfile.open(path, "w:gz") as tar:
        tar.add(tree / "train", arcname="train")
        tar.add(tree / "test", arcname="test")
        tar.addfile(extra, io.BytesIO(payload) if payload else None)
    return path


@pytest.mark.parametrize(("kind", "message"), [
    ("escape", "unsafe name"), ("absolute", "unsafe name"), ("symlink", "link or device"),
    ("device", "link or device")])
def test_hostile_tar_members_are_refused_and_nothing_is_written(tmp_path: Path, kind: str, message: str,
                                                                 capsys: pytest.CaptureFixture) -> None:
    name = {"escape": "../outside/train/cat/evil.png", "absolute": "/tmp/train/cat/evil.png"}.get(
        kind, "train/cat/evil.png")
    info = tarfile.TarInfo(name)
    payload = b""
    if kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "device":
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    else:
        payload = encode(Image.fromarray(class_images(1, 0)[0][0])).tobytes()
        info.size = len(payload)
    archive = tar_with(tmp_path / "data.tar.gz", info, payload)
    before = set(tmp_path.rglob("*"))
    assert run_main(train_main, ["resnet8", "--data", str(archive), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert set(tmp_path.rglob("*")) == before and not Path("/tmp/train/cat/evil.png").exists()


def test_random_bytes_archive_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "cifar.tar.gz"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    assert run_main(train_main, ["resnet8", "--data", str(bad), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unreadable archive" in err


def test_a_stray_folder_beside_the_tree_is_never_walked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = write_tree(tmp_path / "tree", {"train": 2, "test": 1})
    stray = tree / "node_modules"
    for i in range(300):
        (stray / f"d{i % 10}").mkdir(parents=True, exist_ok=True)
        (stray / f"d{i % 10}" / f"{i}.png").write_bytes(b"x")
    seen: list[Path] = []
    real_stat, real_scandir = Path.stat, os.scandir
    monkeypatch.setattr(Path, "stat", lambda self, **kw: seen.append(self) or real_stat(self, **kw))
    monkeypatch.setattr(os, "scandir", lambda path=".": seen.append(Path(path)) or real_scandir(path))
    source = sources.resolve(tree)
    sources.load(source)
    assert seen and not [p for p in seen if "node_modules" in p.parts]
    assert len(images.scan_tree(tree)[0]) == 30


def test_non_utf8_file_names_are_read(tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "tree", {"train": 2, "test": 1})
    src = sorted((tree / "train" / "cat").iterdir())[0]
    odd = os.path.join(os.fsencode(src.parent), b"\xff\xfe-chat.png")
    os.rename(src, odd)
    splits = sources.load(sources.resolve(tree))
    assert len(splits.train) == 20


def test_a_damaged_cache_is_detected_rebuilt_and_said(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tree = write_tree(tmp_path / "tree", {"train": 2, "test": 1})
    cache = tmp_path / "cache"
    good = sources.load(sources.resolve(tree), cache)
    [npz] = (cache / "decoded").glob("*.npz")
    for damage in ("truncate", "flip"):
        data = bytearray(npz.read_bytes())
        if damage == "truncate":
            data = data[: len(data) // 2]
        else:  # one pixel changed inside the stored array: the zip is whole, the data is not
            raw = good.train.images.tobytes()
            at = bytes(data).find(raw[:64])
            data[at + 100] ^= 0xFF
        npz.write_bytes(bytes(data))
        again = sources.load(sources.resolve(tree), cache)
        assert "decoded-data cache" in capsys.readouterr().err
        assert np.array_equal(again.train.images, good.train.images)
    sources.load(sources.resolve(tree), cache)
    assert capsys.readouterr().err == ""  # rebuilt: used silently again


def test_a_large_image_under_pillows_limit_is_refused_by_its_size_before_decoding(
        monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.BytesIO()
    Image.new("1", (6000, 6000)).save(buf, format="PNG")
    monkeypatch.setattr(Image.Image, "convert", lambda *a, **k: pytest.fail("decoded a huge image"))
    with pytest.raises(DataError, match="image is 6000x6000, expected 32x32"):
        images.decode_file(np.frombuffer(buf.getvalue(), np.uint8))
