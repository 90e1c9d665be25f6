"""Export a run's trained weights: `python -m fastres.export RUN_DIR OUT.pt`.

Writes the weights alone (a plain state dict of tensors, `torch.load(..., weights_only=True)`
reads it) and `OUT.json` beside it: model, shortcut, dataset, class names, normalisation,
the iteration and, for a finished run, its final test error. Both are written atomically.
Load them with `fastres.weights.load_model("OUT.pt")`, or `python -m fastres.evaluate OUT.pt`.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import torch

from fastres import atomic, checkpoint, rundir, weights
from fastres.cli import Parser, run_main
from fastres.data.dataset import DATASETS
from fastres.errors import RunError, UsageError
from fastres.rundir import RunDir


def export(run: Path, out: Path) -> dict:
    """Write `out` and its JSON from a run directory or checkpoint; returns the JSON's content."""
    if out.suffix != ".pt":
        raise UsageError(f"{out}: the weights file must end in .pt (its description goes beside it, .json)")
    ckpt = rundir.read_checkpoint(run)
    refuse_overwrite(out)
    cfg, norm = ckpt.config, ckpt.normalization
    if norm is None:
        raise RunError(f"{run}: this checkpoint predates saved normalisation (format 0); resume it for one "
                       "checkpoint, then export")
    classes = DATASETS[cfg.dataset].classes
    weights.load_into(cfg.spec.build(len(classes)), ckpt.model, str(run))  # weights that fit their model, or one line
    results = RunDir(run).results() if Path(run).is_dir() else None
    meta = {"model": cfg.model, "shortcut": cfg.shortcut, "tag": cfg.spec.tag, "dataset": cfg.dataset,
            "classes": list(classes), "num_classes": len(classes), "step": ckpt.step, "iters": cfg.iters,
            "normalize": cfg.normalize, "normalization": {"mean": norm.mean.tolist(), "std": norm.std.tolist()},
            "input": "RGB, 32x32, scaled to [0, 1], then (x - mean) / std, NCHW", "precision": cfg.precision,
            "test_error": results["test_error"] if results else None, "format": 1}
    buf = io.BytesIO()
    torch.save({k: v.clone() for k, v in ckpt.model.items()}, buf)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create {out.parent} for the export ({e.strerror})") from None
    atomic.write_bytes(out, buf.getvalue())
    # one line a key: the per-pixel mean and std (3,072 numbers each) stay on one line each
    text = "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in meta.items()) + "\n}\n"
    atomic.write_bytes(weights.meta_path(out), text.encode())
    return meta


def refuse_overwrite(out: Path) -> None:
    """An export replaces only an earlier export (a tensor state dict and the description
    fastres wrote beside it), never a run's files or anything else that is there."""
    described = weights.meta_path(out)
    if rundir.is_own_name(out) or rundir.is_own_name(described):
        raise UsageError(f"{out}: a run directory's own file name; export to another name")
    present = [p for p in (out, described) if p.exists()]
    if not present:
        return
    try:  # an earlier export: both files there, a state dict of tensors and its description
        state = checkpoint.load_file(out, "weights")
        earlier = _tensors_only(state) and bool(weights.read_meta(out))
    except RunError:
        earlier = False
    if not earlier:
        raise UsageError(f"{', '.join(map(str, present))} already exists and is not an earlier export; choose "
                         "another name, or move it away first")


def _tensors_only(state: object) -> bool:
    return isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m fastres.export", description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a run directory or its checkpoint.pt")
    p.add_argument("out", type=Path, help="the weights file to write (.pt); its .json goes beside it")
    args = p.parse_args(argv)
    meta = export(args.run, args.out)
    print(f"exported {meta['tag']} at iteration {meta['step']} to {args.out} and {weights.meta_path(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
