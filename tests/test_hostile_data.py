"""Hostile and odd data: each case is read correctly or refused in one line, nothing is
written outside the cache and run directories, and a damaged cache is never used."""

import builtins
import contextlib
import io
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import class_images, fifo_writer, write_tree
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


@pytest.mark.parametrize("kind", ["random bytes", "official archive cut", "image archive cut"])
def test_an_unreadable_archive_is_the_same_one_line_whoever_reads_it(tmp_path: Path, tiny_official: Path, kind: str,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """Random bytes fail at the look at the archive's kind (sources), a cut official archive
    in its batches (official), a cut image archive in its images (images)."""
    bad = tmp_path / "cifar.tar.gz"
    if kind == "random bytes":
        bad.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        whole = tiny_official if kind == "official archive cut" else tar_with(tmp_path / "whole.tar.gz",
                                                                              tarfile.TarInfo("README"))
        bad.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert run_main(train_main, ["resnet8", "--data", str(bad), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}: unreadable archive (" in err and "truncated or corrupt" in err


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


GIB3 = 3 << 30  # a multiple of tar's 512-byte blocks


def raw_tar(path: Path, members: list[tuple[str, bytes | int]]) -> Path:
    """An uncompressed tar written by hand: a member given as a number declares that many
    bytes and is a hole on disk (sparse, nothing of it written)."""
    with open(path, "wb") as f:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = data if isinstance(data, int) else len(data)
            f.write(info.tobuf())
            if isinstance(data, int):
                f.seek(data, os.SEEK_CUR)
            else:
                f.write(data + b"\0" * (-len(data) % tarfile.BLOCKSIZE))
        f.write(b"\0" * 2 * tarfile.BLOCKSIZE)
    return path


def tree_members(tree: Path) -> list[tuple[str, bytes]]:
    return [(str(p.relative_to(tree)), p.read_bytes()) for p in sorted(tree.rglob("*.png"))]


def count_member_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of every read from a tar member."""
    sizes: list[int] = []
    real = tarfile.ExFileObject.read
    monkeypatch.setattr(tarfile.ExFileObject, "read", lambda self, *a: sizes.append(len(b := real(self, *a))) or b)
    return sizes


def test_a_huge_tar_member_is_refused_by_its_header_before_any_of_it_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    members = tree_members(write_tree(tmp_path / "tree", {"train": 1, "test": 1}))
    archive = raw_tar(tmp_path / "data.tar", [*members, ("train/cat/zzzz.png", GIB3)])
    assert archive.stat().st_size > GIB3 and archive.stat().st_blocks * 512 < 10 << 20  # sparse on disk
    reads = count_member_reads(monkeypatch)
    with pytest.raises(DataError, match=r"'train/cat/zzzz.png' is 3,221,225,472 bytes, over the bound of 1,048,576"):
        sources.load(sources.resolve(archive))
    assert sum(reads) == sum(len(data) for _, data in members)  # the images before it, and nothing of it


def test_a_tar_member_appended_twice_is_refused(tmp_path: Path) -> None:
    members = tree_members(write_tree(tmp_path / "tree", {"train": 1, "test": 1}))
    archive = raw_tar(tmp_path / "data.tar", [*members, ("./" + members[3][0], members[3][1])])
    with pytest.raises(DataError, match=rf"'./{members[3][0]}' appears twice") as e:
        sources.load(sources.resolve(archive))
    assert "\n" not in str(e.value)


def record_opens(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    opened: list[Path] = []
    real = builtins.open
    monkeypatch.setattr(builtins, "open", lambda file, *a, **k: opened.append(Path(file)) or real(file, *a, **k))
    return opened


def test_huge_files_in_a_tree_are_never_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    tree = write_tree(tmp_path / "tree", {"train": 1, "test": 1})
    backup, huge = tree / "train" / "backup.bin", tree / "train" / "cat" / "huge.png"
    backup.touch()
    os.truncate(backup, GIB3)  # sparse: 3 GB by stat, nothing on disk
    opened = record_opens(monkeypatch)
    assert len(sources.load(sources.resolve(tree)).train) == 10
    assert backup not in opened and len([p for p in opened if p.suffix == ".png"]) == 20
    assert capsys.readouterr().err == ("fastres: note: 1 file under train/ and test/ is not "
                                       "<split>/<class>/<name>.jpg|jpeg|png and was not read (e.g. train/backup.bin)\n")
    huge.touch()
    os.truncate(huge, GIB3)
    with pytest.raises(DataError, match=r"huge.png: 3,221,225,472 bytes, over the bound of 1,048,576 bytes"):
        sources.load(sources.resolve(tree))
    assert huge not in opened and backup not in opened


def test_only_split_class_file_at_the_root_is_read_and_the_rest_is_named(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tree = write_tree(tmp_path / "tree", {"train": 2, "test": 1})
    png = next((tree / "train" / "cat").glob("*.png")).read_bytes()
    for name in ("test/train/cat/00000.png", "train/cat/extra/00000.png", "train/00000.png", "old/train/cat/0.png",
                 "train/cat/UPPER.PNG", "train/cat/.hidden.png", "train/cat/._00000.png", "train/.DS_Store"):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(png)
    (tree / "train" / "backup.bin").write_bytes(b"x")
    (tree / "train" / "cat" / "notes.txt").write_bytes(b"x")
    archive = tmp_path / "both.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname=".")  # members named ./train/...
    note = ("fastres: note: 5 files under train/ and test/ are not <split>/<class>/<name>.jpg|jpeg|png and were "
            "not read (e.g. test/train/cat/00000.png)\n")
    for data in (tree, archive):
        splits = sources.load(sources.resolve(data))
        assert (len(splits.train), len(splits.test)) == (21, 10)  # UPPER.PNG the one more
        assert capsys.readouterr().err == note


@pytest.mark.parametrize(("kind", "message"), [
    ("dangling", "a dangling link"), ("device", "is a link to a device, not an image file"),
    ("fifo", "is a FIFO, not an image file"), ("folder", "is a folder, not an image file"),
    ("unreadable", "cannot read (Input/output error)")])
def test_an_image_path_that_is_not_a_readable_regular_file_is_one_line(
        tmp_path: Path, kind: str, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = write_tree(tmp_path / "tree", {"train": 1, "test": 1})
    bad = tree / "train" / "dog" / "bad.png"
    make = {"dangling": lambda: bad.symlink_to(tmp_path / "gone.png"), "device": lambda: bad.symlink_to("/dev/zero"),
            "fifo": lambda: os.mkfifo(bad), "folder": bad.mkdir,
            "unreadable": lambda: bad.symlink_to("/proc/self/mem")}  # stat says a file of 0 bytes; reading fails
    make[kind]()
    opened = record_opens(monkeypatch)
    with fifo_writer(bad) if kind == "fifo" else contextlib.nullcontext(), \
            pytest.raises(DataError, match=re.escape(f"{bad}: {message}")) as e:
        sources.load(sources.resolve(tree))
    assert "\n" not in str(e.value)
    assert (bad in opened) == (kind == "unreadable")  # only a regular file is ever opened


def test_an_official_batch_over_its_bound_is_refused_by_its_header(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    archive = raw_tar(tmp_path / "small-cifar.tar", [("cifar-10-batches-py/data_batch_1", GIB3)])
    reads = count_member_reads(monkeypatch)
    with pytest.raises(DataError, match="data_batch_1' is 3,221,225,472 bytes, over the 268,435,456"):
        sources.load(sources.resolve(archive))
    assert reads == []


def test_a_split_archive_holds_its_own_split_alone(tmp_path: Path) -> None:
    """train.tar.gz that also holds test/: those are not more test images (the test split is
    test.tar.gz's): read for neither split."""
    tree = write_tree(tmp_path / "tree", {"train": 1, "test": 1})
    data = tmp_path / "data"
    data.mkdir()
    with tarfile.open(data / "train.tar.gz", "w:gz") as tar:
        tar.add(tree / "train", arcname="train")
        tar.add(tree / "test", arcname="test")
    with tarfile.open(data / "test.tar.gz", "w:gz") as tar:
        tar.add(tree / "test", arcname="test")
    splits = sources.load(sources.resolve(data), tmp_path / "cache")
    assert (len(splits.train), len(splits.test)) == (10, 10)
