"""Carrying wheels in parts: split, check, reassemble and install, offline (tiny wheels
built here stand in for DALI's)."""

import base64
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastres.cli import run_main  # noqa: E402
from scripts import dali_wheels  # noqa: E402


def make_wheel(folder: Path, name: str, payload_bytes: int) -> Path:
    """A minimal pure-Python wheel whose module holds `payload_bytes` of incompressible data."""
    files = {f"{name}/__init__.py": f"DATA = {bytes(range(256)) * (payload_bytes // 256)!r}\n".encode(),
             f"{name}-0.1.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n".encode(),
             f"{name}-0.1.dist-info/WHEEL":
                 b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\n" for path, data in files.items()) + f"{name}-0.1.dist-info/RECORD,,\n"
    files[f"{name}-0.1.dist-info/RECORD"] = record.encode()
    wheel = folder / f"{name}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as z:
        for path, data in files.items():
            z.writestr(path, data)
    return wheel


def test_split_then_install_from_parts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name, size in (("fastres_probe_a", 20_000), ("fastres_probe_b", 5_000)):
        make_wheel(wheels, name, size)
    parts = tmp_path / "parts"
    assert run_main(dali_wheels.main, ["split", str(wheels), str(parts), "--part-mib", str(16_000 / 2**20)]) == 0
    names = sorted(p.name for p in parts.iterdir())
    assert len(names) >= 4 and all((parts / n / "blob").stat().st_size <= 16_000 for n in names)

    missing = parts / names[2] / "blob"
    kept = missing.read_bytes()
    missing.unlink()  # a part not sent yet
    assert run_main(dali_wheels.main, ["install", str(parts), str(tmp_path / "site")]) == 2
    assert f"{names[2]}/blob: missing" in capsys.readouterr().err
    missing.write_bytes(kept[:-1] + bytes([kept[-1] ^ 1]))  # a part damaged on the way
    assert run_main(dali_wheels.main, ["install", str(parts), str(tmp_path / "site")]) == 2
    assert "damaged" in capsys.readouterr().err
    missing.write_bytes(kept)

    assert run_main(dali_wheels.main, ["install", str(parts), str(tmp_path / "site")]) == 0
    out = subprocess.run([sys.executable, "-c", "import fastres_probe_a, fastres_probe_b; "
                          "print(len(fastres_probe_a.DATA), len(fastres_probe_b.DATA))"],
                         env={"PYTHONPATH": str(tmp_path / "site")}, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["19968", "4864"]


def test_wheels_the_target_has_are_not_sent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert dali_wheels.project_of(Path("nvidia_dali_cuda130-2.4.0-py3-none-manylinux_2_28_x86_64.whl")) == \
        "nvidia-dali-cuda130"
    # what pip brings that the GPU machine has already is dropped before anything is sent
    # (pip stands in here: it "downloads" DALI and numpy)
    def pip(cmd: list[str]) -> subprocess.CompletedProcess:
        dest = Path(cmd[cmd.index("-d") + 1])
        for name in ("nvidia_dali_cuda130-2.4.0-py3-none-manylinux_2_28_x86_64.whl",
                     "numpy-2.3.0-cp312-cp312-manylinux_2_28_x86_64.whl"):
            (dest / name).write_bytes(b"wheel")
        return subprocess.CompletedProcess(cmd, 0)
    monkeypatch.setattr(dali_wheels.subprocess, "run", pip)
    kept = dali_wheels.download(tmp_path, dali_wheels.PACKAGE, "3.12", dali_wheels.PRESENT)
    assert [w.name for w in kept] == ["nvidia_dali_cuda130-2.4.0-py3-none-manylinux_2_28_x86_64.whl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [w.name for w in kept]
