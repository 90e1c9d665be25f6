"""Carry NVIDIA DALI to an offline GPU machine that takes at most 64 MiB per command.

    python scripts/dali_wheels.py download .dali/wheels     # here: DALI for CUDA 13 / Python 3.12, and its needs
    python scripts/dali_wheels.py split .dali/wheels .dali  # here: .dali/part-000/, part-001/, ... of <= 60 MiB
    python scripts/dali_wheels.py install .dali /tmp/dali   # there, once every part has arrived

The wheels (DALI alone is about 200 MB, its image codecs and compression library more) are
packed into one tar, cut into numbered parts with a manifest of SHA-256 sums, and sent one
part folder per command (the parts already sent stay in the ignored folder while the machine
is held). `install` checks every part, reassembles, and installs with pip from the files
alone (no index) into a target folder to put on PYTHONPATH.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastres.atomic import write_json  # noqa: E402
from fastres.cli import Parser, run_main  # noqa: E402
from fastres.errors import RunError, UsageError  # noqa: E402

PACKAGE = "nvidia-dali-cuda130"  # the build for the GPU machine's CUDA 13 (torch 2.11+cu130)
# Already on the GPU machine's image (device tool, KINDS.md): not sent again.
PRESENT = ("numpy", "packaging", "six", "typing-extensions", "pyyaml")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
MANIFEST = "manifest.json"
CHUNK = 1 << 20


def project_of(wheel: Path) -> str:
    """The normalised project name of a wheel file (`nvidia_dali_cuda130-2.4.0-...whl`)."""
    return wheel.name.split("-")[0].lower().replace("_", "-")


def download(dest: Path, package: str, python: str, skip: tuple[str, ...]) -> list[Path]:
    """The package and everything it needs, as wheels for the target Python and platform."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--python-version", python,
           "--implementation", "cp", "-d", str(dest), package]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    if subprocess.run(cmd).returncode != 0:
        raise RunError(f"pip could not download {package} for Python {python}")
    wheels = sorted(dest.glob("*.whl"))
    for wheel in wheels:
        if project_of(wheel) in skip:
            wheel.unlink()
    return sorted(dest.glob("*.whl"))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split(wheels_dir: Path, parts_dir: Path, part_mib: float) -> dict:
    """Pack the wheels into one tar and cut it into `part-NNN/blob` files of at most
    `part_mib` MiB, with a manifest (in part-000) of every part's and the whole's SHA-256."""
    wheels = sorted(wheels_dir.glob("*.whl"))
    if not wheels:
        raise UsageError(f"{wheels_dir}: no wheels to split")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:  # wheels are zip files already: no compression
        for wheel in wheels:
            tar.add(wheel, arcname=wheel.name)
    blob = buf.getvalue()
    size = int(part_mib * 2**20)
    pieces = [blob[i:i + size] for i in range(0, len(blob), size)]
    manifest = {"wheels": [w.name for w in wheels], "bytes": len(blob), "sha256": sha256(blob),
                "parts": [{"name": f"part-{k:03d}", "bytes": len(p), "sha256": sha256(p)}
                          for k, p in enumerate(pieces)]}
    for part, piece in zip(manifest["parts"], pieces, strict=True):
        folder = parts_dir / part["name"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "blob").write_bytes(piece)
    write_json(parts_dir / "part-000" / MANIFEST, manifest)
    return manifest


def assemble(parts_dir: Path) -> bytes:
    """The tar of wheels, from parts that are all present and intact (one line otherwise)."""
    manifest_path = parts_dir / "part-000" / MANIFEST
    if not manifest_path.is_file():
        raise RunError(f"{manifest_path}: missing; send part-000 first")
    manifest = json.loads(manifest_path.read_text())
    pieces = []
    for part in manifest["parts"]:
        path = parts_dir / part["name"] / "blob"
        if not path.is_file():
            raise RunError(f"{path}: missing ({len(manifest['parts'])} parts in all); send it, then install again")
        data = path.read_bytes()
        if sha256(data) != part["sha256"]:
            raise RunError(f"{path}: damaged (SHA-256 differs from the manifest); send it again")
        pieces.append(data)
    blob = b"".join(pieces)
    if sha256(blob) != manifest["sha256"]:
        raise RunError("the reassembled wheels differ from the manifest's SHA-256")
    return blob


def install(parts_dir: Path, target: Path) -> list[str]:
    """Reassemble and install every wheel into `target` with pip, offline."""
    blob = assemble(parts_dir)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            tar.extractall(tmp, filter="data")
        wheels = sorted(str(p) for p in Path(tmp).glob("*.whl"))
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(target), *wheels]
        if subprocess.run(cmd).returncode != 0:
            raise RunError(f"pip could not install the wheels into {target}")
    return [Path(w).name for w in wheels]


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python scripts/dali_wheels.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="download the wheels (here, with the package index)")
    d.add_argument("dest", type=Path)
    d.add_argument("--package", default=PACKAGE)
    d.add_argument("--python", default="3.12", help="the GPU machine's Python (default 3.12)")
    d.add_argument("--skip", default=",".join(PRESENT), help="projects the target has already")
    s = sub.add_parser("split", help="cut the wheels into parts of at most --part-mib MiB")
    s.add_argument("wheels", type=Path)
    s.add_argument("parts", type=Path)
    s.add_argument("--part-mib", type=float, default=60.0)
    i = sub.add_parser("install", help="check, reassemble and install the parts (there, offline)")
    i.add_argument("parts", type=Path)
    i.add_argument("target", type=Path)
    args = p.parse_args(argv)
    if args.command == "download":
        wheels = download(args.dest, args.package, args.python, tuple(args.skip.split(",")))
        total = sum(w.stat().st_size for w in wheels) / 2**20
        print(f"{len(wheels)} wheels, {total:.0f} MiB in {args.dest}")
    elif args.command == "split":
        manifest = split(args.wheels, args.parts, args.part_mib)
        names = [part["name"] for part in manifest["parts"]]
        print(f"{len(names)} parts in {args.parts}: send each folder with one command (carry {args.parts}/NAME): "
              f"{', '.join(names)}")
    else:
        names = install(args.parts, args.target)
        print(f"installed {len(names)} wheels into {args.target}; use: export PYTHONPATH={args.target}:$PYTHONPATH")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
