import hashlib
import io
import os
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import class_images, write_official, write_tree
from PIL import Image

from fastres.data import images, official, pool, sources
from fastres.data.dataset import CIFAR10, hold_out
from fastres.errors import DataError


def test_official_reader_keeps_batch_order_and_pixels(tmp_path: Path) -> None:
    path, train_images = write_official(tmp_path / "a.tar.gz", per_batch=20)
    splits = official.read_archive(path)
    assert splits.train.images.shape == (100, 32, 32, 3) and splits.test.images.shape == (20, 32, 32, 3)
    assert np.array_equal(splits.train.images, train_images)
    assert splits.train.labels.dtype == np.int64 and set(splits.train.labels) == set(range(10))


def test_official_md5_checked(tmp_path: Path) -> None:
    path, _ = write_official(tmp_path / CIFAR10.archive)
    with pytest.raises(DataError, match="md5"):
        sources.load(sources.resolve(path))  # the official name is held to the official md5
    good = hashlib.md5(path.read_bytes()).hexdigest()
    assert len(official.read_archive(path, md5=good).train) == 50


def test_official_missing_batch(tmp_path: Path) -> None:
    path, _ = write_official(tmp_path / "a.tar.gz", drop="data_batch_3")
    with pytest.raises(DataError, match="data_batch_3"):
        official.read_archive(path)


def test_truncated_archive(tmp_path: Path, tiny_official: Path) -> None:
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(tiny_official.read_bytes()[: tiny_official.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        official.read_archive(cut)


def test_download_from_url(tmp_path: Path, tiny_official: Path) -> None:
    md5 = hashlib.md5(tiny_official.read_bytes()).hexdigest()
    dest = official.download(tiny_official.as_uri(), tmp_path / "dl" / CIFAR10.archive, md5)
    assert dest.read_bytes() == tiny_official.read_bytes()
    with pytest.raises(DataError, match="md5"):
        official.download(tiny_official.as_uri(), tmp_path / "bad" / CIFAR10.archive, "0" * 32)
    assert not list((tmp_path / "bad").iterdir())  # nothing half-written is left behind


def test_offline_message(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--data PATH") as e:
        sources.resolve(None, cache_dir=tmp_path, url=(tmp_path / "nowhere.tar.gz").as_uri())
    assert "\n" not in str(e.value)


def test_image_tree_reader(tiny_tree: Path) -> None:
    splits = sources.load(sources.resolve(tiny_tree))
    assert splits.train.images.shape == (160, 32, 32, 3) and len(splits.test) == 40
    expected, labels = class_images(16, seed=0)
    assert np.array_equal(splits.train.images, expected)  # PNG is lossless; order is class, file
    assert np.array_equal(splits.train.labels, labels)


def test_image_archives_match_tree(tmp_path: Path, tiny_tree: Path) -> None:
    one = tmp_path / "both.tar"
    with tarfile.open(one, "w") as tar:
        tar.add(tiny_tree / "train", "train")
        tar.add(tiny_tree / "test", "test")
    folder = tmp_path / "split"
    folder.mkdir()
    for split in ("train", "test"):
        with tarfile.open(folder / f"{split}.tar.gz", "w:gz") as tar:
            tar.add(tiny_tree / split, split)
    ref = sources.load(sources.resolve(tiny_tree))
    for path in (one, folder):
        got = sources.load(sources.resolve(path))
        assert np.array_equal(got.train.images, ref.train.images) and np.array_equal(got.test.labels, ref.test.labels)


def test_cache_is_used(tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "t", {"train": 2, "test": 1})
    cache = tmp_path / "cache"
    first = sources.load(sources.resolve(tree), cache)
    assert len(list((cache / "decoded").glob("*.npz"))) == 1
    # Corrupt one source image without changing its size or mtime: the cache still answers.
    png = next((tree / "train" / "cat").glob("*.png"))
    st = png.stat()
    png.write_bytes(b"\0" * st.st_size)
    os.utime(png, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = sources.load(sources.resolve(tree), cache)
    assert np.array_equal(first.train.images, again.train.images)


def test_wrong_size_image(tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "t", {"train": 1, "test": 1})
    Image.new("RGB", (28, 32)).save(tree / "train" / "cat" / "odd.png")
    with pytest.raises(DataError, match="28x32"):
        sources.load(sources.resolve(tree))


def test_corrupt_image(tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "t", {"train": 1, "test": 1})
    (tree / "train" / "dog" / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="cannot decode"):
        sources.load(sources.resolve(tree))


@pytest.mark.parametrize("packed", [False, True])
def test_missing_class(tmp_path: Path, packed: bool) -> None:
    """A tree or an archive of one, read decoded or encoded (DALI's), lacking class folders:
    the same one line, naming the split and the classes."""
    tree = write_tree(tmp_path / "t", {"train": 1, "test": 1})
    shutil.rmtree(tree / "test" / "frog")
    for cls in ("airplane", "automobile", "bird", "cat", "deer", "dog"):
        shutil.rmtree(tree / "train" / cls)
    data = tree
    if packed:
        data = tmp_path / "t.tar"
        with tarfile.open(data, "w") as tar:
            tar.add(tree / "train", arcname="train")
            tar.add(tree / "test", arcname="test")
    expected = "train: no images of class airplane, automobile, bird, cat, deer and 1 more"
    with pytest.raises(DataError, match=f"^{expected}$"):
        sources.load(sources.resolve(data))
    with pytest.raises(DataError, match="^test: no images of class frog$"):
        images.read_encoded([data], ("test",))


def test_unknown_class(tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "t", {"train": 1, "test": 1})
    (tree / "train" / "unicorn").mkdir()
    Image.new("RGB", (32, 32)).save(tree / "train" / "unicorn" / "0.png")
    with pytest.raises(DataError, match="unicorn"):
        images.read_encoded([tree])


@pytest.mark.parametrize("make", ["missing", "empty_dir", "text_file"])
def test_resolve_errors(tmp_path: Path, make: str) -> None:
    path = tmp_path / "x"
    if make == "empty_dir":
        path.mkdir()
    elif make == "text_file":
        path.write_text("hello")
    with pytest.raises(DataError):
        sources.resolve(path)


def test_val_split_is_seeded_and_disjoint(tiny_tree: Path) -> None:
    full = sources.load(sources.resolve(tiny_tree))
    a, b = hold_out(full, 30, seed=1), hold_out(full, 30, seed=1)
    assert len(a.train) == 130 and len(a.val) == 30 and len(a.test) == 40
    assert np.array_equal(a.val.images, b.val.images)
    rows = {r.tobytes() for r in a.train.images} & {r.tobytes() for r in a.val.images}
    assert not rows
    with pytest.raises(DataError):
        hold_out(full, 160, seed=0)


# CIFAR-10's label names in label order, as the official archive's batches.meta lists them.
OFFICIAL_ORDER = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def test_a_trees_labels_follow_the_official_order_by_folder_name(tmp_path: Path) -> None:
    """Folders made in reverse order, each image's pixels holding the official label of its
    folder: the labels read are those, whatever order the folders were listed in."""
    for split in ("train", "test"):
        for label in reversed(range(10)):
            (tmp_path / split / OFFICIAL_ORDER[label]).mkdir(parents=True)
            Image.new("RGB", (32, 32), (label, 0, 0)).save(tmp_path / split / OFFICIAL_ORDER[label] / "a.png")
    splits = sources.load(sources.resolve(tmp_path))
    assert splits.train.labels.tolist() == list(range(10)) == splits.train.images[:, 0, 0, 0].tolist()


def run_files(folder: Path) -> None:
    folder.mkdir(parents=True)
    for name in ("checkpoint.pt", "metrics.jsonl", "config.json"):
        (folder / name).write_bytes(b"{}")


def test_the_cache_key_is_the_files_read_so_run_outputs_in_the_tree_do_not_change_it(tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "t", {"train": 1, "test": 1})
    cache = tmp_path / "cache"
    key = sources.fingerprint(sources.resolve(tree))
    sources.load(sources.resolve(tree), cache)
    for run in (tree / "runs" / "r1", tree / "train" / "runs" / "r1", tree / "train" / "cat" / "r2"):
        run_files(run)
    (tree / "test" / "cat" / "checkpoint.pt").write_bytes(b"{}")
    assert sources.fingerprint(sources.resolve(tree)) == key
    sources.load(sources.resolve(tree), cache)
    assert [p.name for p in (cache / "decoded").iterdir()] == [f"{key}.npz"]


def test_a_changed_image_replaces_the_entry_of_its_source_alone(tmp_path: Path) -> None:
    a, b = write_tree(tmp_path / "a", {"train": 1, "test": 1}), write_tree(tmp_path / "b", {"train": 1, "test": 1})
    cache = tmp_path / "cache"
    old_a, key_b = sources.fingerprint(sources.resolve(a)), sources.fingerprint(sources.resolve(b))
    for tree in (a, b):
        sources.load(sources.resolve(tree), cache)
    Image.new("RGB", (32, 32), (1, 2, 3)).save(next((a / "train" / "cat").glob("*.png")))
    new_a = sources.fingerprint(sources.resolve(a))
    assert new_a != old_a and new_a.split("-")[0] == old_a.split("-")[0]  # same source, new content
    got = sources.load(sources.resolve(a), cache)
    assert got.train.images[3, 0, 0].tolist() == [1, 2, 3]
    assert sorted(p.name for p in (cache / "decoded").iterdir()) == sorted([f"{new_a}.npz", f"{key_b}.npz"])


def test_the_cache_command_lists_and_clears_only_what_fastres_wrote(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from fastres.cache import main as cache_main
    from fastres.cli import run_main

    cache = tmp_path / "cache"
    monkeypatch.setenv("FASTRES_CACHE", str(cache))
    key = sources.fingerprint(sources.resolve(write_tree(tmp_path / "t", {"train": 1, "test": 1})))
    sources.load(sources.resolve(tmp_path / "t"))
    decoded = cache / "decoded"
    mine = [decoded / "mine.npz", decoded / "notes.txt", decoded / f".{key}.npz.tmp", cache / "cifar-10-python.tar.gz"]
    leftovers = [decoded / f".{key}.npz.k2_8xq9a.tmp", cache / "cifar-10-python.tar.gz.part"]
    for i, path in enumerate(mine + leftovers):
        path.write_bytes(b"x" * (i + 1))
    entry = (decoded / f"{key}.npz").stat().st_size
    assert run_main(cache_main, []) == 0
    listed = capsys.readouterr().out
    assert f"{key}.npz  (decoded data)" in listed and "cifar-10-python.tar.gz  (downloaded archive" in listed
    assert f"{entry + 4 + 5 + 6:,} bytes  in all, 4 files" in listed and "mine.npz" not in listed
    assert run_main(cache_main, ["--clear"]) == 0
    assert capsys.readouterr().out.endswith(f"removed 3 files, {entry + 5 + 6:,} bytes\n")
    assert sorted(cache.rglob("*")) == sorted([decoded, *mine])


def test_the_extracted_folder_torchvision_leaves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    """`--data ~/data` or `--data ~/data/cifar-10-batches-py`: each file held to its md5 (here the
    tiny files' own, standing in for the published ones), a missing or altered file named."""
    import tarfile

    from fastres.cli import run_main
    from fastres.train import main as train_main

    archive, train_images = write_official(tmp_path / "tiny.tar.gz")
    root = tmp_path / "data"
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    folder = root / "cifar-10-batches-py"
    for p in folder.iterdir():
        monkeypatch.setitem(CIFAR10.file_md5, p.name, official.md5_of(p))
    for data in (root, folder):
        splits = sources.load(sources.resolve(data), tmp_path / f"cache-{data.name}")
        assert np.array_equal(splits.train.images, train_images) and len(splits.test) == 10
    (folder / "data_batch_3").write_bytes((folder / "data_batch_3").read_bytes()[:-1] + b"x")
    assert run_main(train_main, ["resnet8", "--data", str(root), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data_batch_3: md5" in err and "altered or corrupt" in err
    (folder / "data_batch_3").unlink()
    assert run_main(train_main, ["resnet8", "--data", str(folder), "--out", str(tmp_path / "r")]) == 2
    assert "data_batch_3: missing from the extracted cifar10 folder" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


UNUSABLE_CACHES = ["XDG_CACHE_HOME is a file", "FASTRES_CACHE is a file", "an unwritable folder"]


def unusable_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> Path:
    """Point fastres' cache where no download can go; the folder the one line must name."""
    if how == "XDG_CACHE_HOME is a file":
        (tmp_path / "xdg").write_text("")
        monkeypatch.delenv("FASTRES_CACHE")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        return tmp_path / "xdg" / "fastres"
    folder = tmp_path / "cache"
    if how == "FASTRES_CACHE is a file":
        folder.write_text("")
    else:
        folder.mkdir()
        folder.chmod(0o555)
        if os.access(folder, os.W_OK):
            pytest.skip("this user may write a read-only folder (root): there is no unwritable one to make")
    monkeypatch.setenv("FASTRES_CACHE", str(folder))
    return folder


@pytest.mark.parametrize("how", UNUSABLE_CACHES)
def test_training_and_evaluating_without_data_into_an_unusable_cache_is_one_line(
        tmp_path: Path, tiny_tree: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
        how: str) -> None:
    """No --data: the official archive would be downloaded into the cache. Where it cannot
    go, one line names the folder and the ways out, before any download is tried."""
    from fastres.cli import run_main
    from fastres.evaluate import main as evaluate_main
    from fastres.export import main as export_main
    from fastres.train import main as train_main

    run, weights = tmp_path / "run", tmp_path / "w.pt"
    common = ["--iters", "2", "--eval-every", "2", "--checkpoint-every", "2", "--progress", "none", "--device", "cpu"]
    assert run_main(train_main, ["resnet8", "--data", str(tiny_tree), "--out", str(run), *common]) == 0
    assert run_main(export_main, [str(run), str(weights)]) == 0
    folder = unusable_cache(tmp_path, monkeypatch, how)
    capsys.readouterr()
    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: pytest.fail("a download was tried"))
    for main, argv in ((train_main, ["resnet8", "--out", str(tmp_path / "new"), *common]),
                       (evaluate_main, [str(weights), "--device", "cpu"])):
        assert run_main(main, argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"cache folder {folder} " in err, err
        assert "FASTRES_CACHE" in err and "XDG_CACHE_HOME" in err and "--data" in err


@pytest.mark.parametrize("how", UNUSABLE_CACHES)
def test_the_cache_command_on_an_unusable_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture, how: str) -> None:
    """A file where the cache folder should be is one line naming both, not an empty listing;
    a folder fastres may not write can still be listed."""
    from fastres.cache import main as cache_main
    from fastres.cli import run_main

    folder = unusable_cache(tmp_path, monkeypatch, how)
    for argv in ([], ["--clear"]):
        if how == "an unwritable folder":
            assert run_main(cache_main, argv) == 0
            assert capsys.readouterr().out.startswith(f"fastres cache: {folder}\n")
            continue
        assert run_main(cache_main, argv) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and f"cache folder {folder} " in err, err
        assert f"{tmp_path / ('xdg' if 'XDG' in how else 'cache')} is a file" in err and "FASTRES_CACHE" in err



def packed(members: list[tuple[str, bytes]], path: Path) -> Path:
    """Members, in this order, as a .tar.gz."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def members(tree: Path) -> list[tuple[str, bytes]]:
    return [(str(p.relative_to(tree)), p.read_bytes()) for p in sorted(tree.rglob("*.png"))]


def spy_pools(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The worker count of every process pool started."""
    started: list[int] = []
    real = pool._pooled
    monkeypatch.setattr(pool, "_pooled", lambda fn, a, b, rest, workers, ahead:
                        started.append(workers) or real(fn, a, b, rest, workers, ahead))
    return started


@pytest.mark.parametrize("kind", ["tree", "archive"])
def test_the_parallel_decode_is_the_serial_one(tmp_path: Path, tiny_tree: Path, kind: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """200 images in chunks of 16 on 2 workers, 4 chunks ahead (the read runs ahead of the
    decoding and waits for it): the same arrays, labels and order as one process decoding."""
    data = tiny_tree if kind == "tree" else packed(members(tiny_tree), tmp_path / "t.tar.gz")
    serial = images.read_decoded([data], workers=1)
    monkeypatch.setattr(images, "CHUNK_IMAGES", 16)
    started = spy_pools(monkeypatch)
    parallel = images.read_decoded([data], workers=2, progress="rich")
    assert started == [2]
    for a, b in ((serial.train, parallel.train), (serial.test, parallel.test)):
        assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels) and len(a) > 0


@pytest.mark.parametrize("first", ["undecodable", "duplicate"])
def test_the_parallel_decode_raises_the_first_error_in_reading_order(tmp_path: Path, tiny_tree: Path, first: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An image a worker cannot decode (the 40th read) and a member the reader refuses (a
    duplicate, the 20th or the last read), in either order: the one line raised is the
    serial decode's, about the file read first."""
    files = members(tiny_tree)
    files[39] = (files[39][0], b"not a png")
    at = 19 if first == "duplicate" else len(files)
    archive = packed(files[:at] + [files[0]] + files[at:], tmp_path / "t.tar.gz")
    with pytest.raises(DataError) as serial:
        images.read_decoded([archive], workers=1)
    assert ("cannot decode" if first == "undecodable" else "appears twice") in str(serial.value)
    monkeypatch.setattr(images, "CHUNK_IMAGES", 16)
    started = spy_pools(monkeypatch)
    with pytest.raises(DataError) as parallel:
        images.read_decoded([archive], workers=2)
    # the same line but for the address in Pillow's words ("<_io.BytesIO object at 0x7f...>")
    line = [re.sub("0x[0-9a-f]+", "", str(e.value)) for e in (serial, parallel)]
    assert started == [2] and line[0] == line[1]
    assert "\n" not in str(parallel.value)
