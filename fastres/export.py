"""Export a run's trained weights: `python -m fastres.export RUN_DIR OUT.pt`.

Writes the weights alone (a plain state dict of tensors, `torch.load(..., weights_only=True)`
reads it) and `OUT.json` beside it: model, shortcut, dataset, class names, normalisation,
the iteration and, for a finished run, its final test error. Both are written atomically.
Load them with `build_model(name, weights="OUT.pt")`, or `python -m fastres.evaluate OUT.pt`.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import torch

from fastres import atomic, checkpoint
from fastres.cli import Parser, run_main
from fastres.data.dataset import DATASETS
from fastres.errors import RunError, UsageError


def export(run: Path, out: Path) -> dict:
    """Write `out` and its JSON from a run directory or checkpoint; returns the JSON's content."""
    if out.suffix != ".pt":
        raise UsageError(f"{out}: the weights file must end in .pt (its description goes beside it, .json)")
    state = checkpoint.load(run)
    cfg = checkpoint.config_of(state)
    norm = state.get("normalization")
    if norm is None:
        raise RunError(f"{run}: this checkpoint predates saved normalisation (format 0); resume it for one "
                       "checkpoint, then export")
    results = Path(run) / checkpoint.RESULTS if Path(run).is_dir() else None
    classes = DATASETS[cfg.dataset].classes
    meta = {"model": cfg.model, "shortcut": cfg.shortcut, "tag": cfg.spec.tag, "dataset": cfg.dataset,
            "classes": list(classes), "num_classes": len(classes), "step": state["step"], "iters": cfg.iters,
            "normalize": cfg.normalize, "normalization": {"mean": norm["mean"].tolist(), "std": norm["std"].tolist()},
            "input": "RGB, 32x32, scaled to [0, 1], then (x - mean) / std, NCHW", "precision": cfg.precision,
            "test_error": None, "format": 1}
    if results is not None and results.is_file():
        import json

        meta["test_error"] = json.loads(results.read_text()).get("test_error")
    buf = io.BytesIO()
    torch.save({k: v.clone() for k, v in state["model"].items()}, buf)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(out, buf.getvalue())
    atomic.write_json(out.with_suffix(".json"), meta)
    return meta


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m fastres.export", description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a run directory or its checkpoint.pt")
    p.add_argument("out", type=Path, help="the weights file to write (.pt); its .json goes beside it")
    args = p.parse_args(argv)
    meta = export(args.run, args.out)
    print(f"exported {meta['tag']} at iteration {meta['step']} to {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
