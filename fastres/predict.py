"""Top-k classes of image files: `python -m fastres.predict RUN_DIR_OR_WEIGHTS IMAGE...`.

Any image Pillow reads, in any mode (converted as the data loader converts), resized to
32x32 with a note when it is another size, through the model with the normalisation it was
trained with. A rich table, or `--json`. An unreadable image, one over 4096x4096 pixels, or a
path that is not a regular file (a FIFO, a device) is one line and exit 2.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fastres.cli import Parser, run_main
from fastres.data import images
from fastres.data.dataset import DATASETS, IMAGE_SHAPE
from fastres.errors import DataError
from fastres.evaluate import is_export, load_export, load_run
from fastres.weights import WithPreprocessing

# predict resizes every image to 32x32: one of more than 4096x4096 (16 Mpixel) is no CIFAR-like
# picture, and refusing it from its header bounds what decoding may cost (64 MB as RGBA).
MAX_PIXELS = 4096 * 4096
# The largest file an image within MAX_PIXELS needs: 16-bit RGBA stored uncompressed (8 bytes a
# pixel), plus the data reader's room for metadata.
MAX_FILE_BYTES = MAX_PIXELS * 8 + images.MAX_IMAGE_BYTES


def read_image(path: Path) -> tuple[np.ndarray, str | None]:
    """The image as uint8 (32, 32, 3), and a note if it had to be resized. A file that is
    not regular (a FIFO would hang), too large by its size or by its header's pixel count is
    refused before it is opened or decoded."""
    data = images.read_file(path, MAX_FILE_BYTES)
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise DataError(f"{path}: image is {width}x{height}, over the {MAX_PIXELS:,} pixels (4096x4096) "
                                "predict takes; it resizes to 32x32, so give it a smaller copy")
            img.load()
            note = None
            if img.size != IMAGE_SHAPE[:2]:
                note = f"{path}: resized from {width}x{height} to 32x32"
                img = img.convert("RGB").resize(IMAGE_SHAPE[:2], Image.Resampling.BILINEAR)
            return images.to_rgb(img), note
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def predict(weights: str, paths: list[Path], top: int) -> list[dict[str, Any]]:
    """Top-`top` classes and probabilities for each image, in fp32 on the CPU."""
    loaded = load_export(Path(weights)) if is_export(Path(weights)) else load_run(weights)
    cfg, norm = loaded.cfg, loaded.normalization
    if norm is None:
        raise DataError(f"{weights}: this checkpoint predates saved normalisation; resume it for one checkpoint")
    read = [read_image(p) for p in paths]  # every image checked before any output
    for _, note in read:
        if note:
            print(f"fastres: note: {note}", file=sys.stderr)
    wrapped = WithPreprocessing(loaded.model, norm.mean, norm.std).eval()
    with torch.no_grad():
        probs = wrapped(torch.from_numpy(np.stack([image for image, _ in read]))).softmax(1)
    classes = DATASETS[cfg.dataset].classes
    values, indices = probs.topk(min(top, len(classes)), dim=1)
    return [{"image": str(p), "model": cfg.spec.tag, "dataset": cfg.dataset,
             "top": [{"class": classes[i], "probability": round(v, 6)} for v, i in zip(vs.tolist(), ix.tolist(),
                                                                                      strict=True)]}
            for p, vs, ix in zip(paths, values, indices, strict=True)]


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m fastres.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("weights", help="a run directory, its checkpoint.pt, or weights exported by fastres.export")
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=3, help="how many classes per image (default 3)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    if args.top < 1:
        p.error("--top must be at least 1")
    results = predict(args.weights, args.images, args.top)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{results[0]['model']}: top {len(results[0]['top'])}")
    for col in ("image", "class", "probability"):
        table.add_column(col, justify="right" if col == "probability" else "left")
    for r in results:
        for k, t in enumerate(r["top"]):
            table.add_row(r["image"] if k == 0 else "", t["class"], f"{100 * t['probability']:.1f}%")
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
