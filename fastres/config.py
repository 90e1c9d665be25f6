"""One frozen dataclass describes a run; argparse fills it; every checkpoint and result
carries it, so any figure can be traced back to the run that made it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastres import recipe, schedule
from fastres.cli import Parser
from fastres.data.dataset import DATASETS
from fastres.errors import UsageError
from fastres.recipe import NORMALIZATIONS, SHORTCUTS

if TYPE_CHECKING:
    from fastres.models import ModelSpec

# The precisions a run may train in (fastres.runtime.PRECISIONS maps them to dtypes; a test
# holds the two together). This module imports no torch, so `--help` answers at once.
PRECISIONS = ("fp32", "bf16", "fp16", "fp64")

LOADERS = ("torch", "dali")
AMP_DTYPES = ("auto", "bf16", "fp16")
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max: an lr or wd beyond it cannot reach the weights
FUSE = ("auto", "on", "off")
PROGRESS = ("auto", "rich", "plain", "none")


@dataclass(frozen=True)
class Role:
    """What a RunConfig field is to the code around it; ROLES holds one for each field.

    flag: the option that sets the field, or how a message names one that no option sets.
    free: may differ between the runs of one fused group (the rest is one graph, one schedule).
    compared: a report averages runs of one model only when they agree on it (data, dataset
    and precision as their results record them).
    on_resume: "fixed", the saved value; "given", may be given to --resume again, as it changes
    no result; "found", resolved or measured at the start: what the run found, not what was asked.
    """

    flag: str
    free: bool
    compared: bool
    on_resume: Literal["fixed", "given", "found"]


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides what a run computes, plus where it writes (each field's role: ROLES)."""

    model: str
    shortcut: str | None = None  # ResNets: A (the paper's default), B or C; None for plain nets
    iters: int = recipe.ITERS
    milestones: tuple[int, ...] = recipe.MILESTONES
    lr: float = recipe.LR
    warmup_iters: int = 0
    warmup_lr: float = recipe.WARMUP_LR
    momentum: float = recipe.MOMENTUM
    weight_decay: float = recipe.WEIGHT_DECAY
    batch_size: int = recipe.BATCH_SIZE
    seed: int = 0
    dataset: str = "cifar10"  # cifar10 or cifar100 (its 100 fine labels)
    data: str | None = None
    val_split: int = 0
    normalize: str = recipe.NORMALIZE
    loader: str = "torch"
    device: str = "auto"
    amp: bool = False
    amp_dtype: str = "auto"  # bf16 where the device computes it natively; else fp16 on a GPU, fp32 on a CPU
    precision: str | None = None  # fp32, bf16, fp16 (resolved from the two above at the start, then kept) or fp64
    channels_last: bool = False
    compile: bool = False
    deterministic: bool = False  # deterministic GPU algorithms: a GPU run repeats bit for bit
    cpu_threads: int | None = None  # torch's CPU threads, recorded at the start: they order the CPU's sums
    eval_every: int = 2000
    eval_batch_size: int = 1000
    log_every: int = 100
    checkpoint_every: int = 2000
    out: str = ""
    progress: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)  # free-form labels (e.g. reproduce.py's schedule scale)

    @property
    def spec(self) -> ModelSpec:
        return parse_spec(self.model, self.shortcut)

    def lr_at(self, step: int) -> float:
        return schedule.lr_at(step, self.lr, self.milestones, self.warmup_iters, self.warmup_lr)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> RunConfig:
        """A validated config from its saved form (config.json, a checkpoint): every value of
        its field's type, else a ValueError naming the field. Unknown keys are ignored (a
        newer fastres may add fields); missing ones take their defaults."""
        if not isinstance(d, dict):
            raise ValueError(f"expected an object of config fields, got {type(d).__name__}")
        if "model" not in d:
            raise ValueError("no field 'model'")
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                ok, what = FIELD_TYPES[f.type]
                if not ok(d[f.name]):
                    raise ValueError(f"field {f.name!r} should be {what}, got {d[f.name]!r:.40}")
                values[f.name] = d[f.name]
        if "milestones" in values:
            values["milestones"] = tuple(values["milestones"])
        return validate(cls(**values))

    def __str__(self) -> str:
        return json.dumps(self.to_dict())


def is_int(v: Any) -> bool:
    """An integer as JSON or torch.load gives it (a bool is not one)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A real number as JSON or torch.load gives it (a bool is not one)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


# What a saved config's value may be, by the field's annotation (a test holds every field to it).
FIELD_TYPES: dict[str, tuple[Any, str]] = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "str | None": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "int": (is_int, "an integer"),
    "int | None": (lambda v: v is None or is_int(v), "an integer or null"),
    "float": (is_number, "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "tuple[int, ...]": (lambda v: isinstance(v, (list, tuple)) and all(is_int(x) for x in v), "a list of integers"),
    "dict[str, Any]": (lambda v: isinstance(v, dict), "an object"),
}


# One row a field, in the dataclass's order; tests/test_config_fields.py holds it to the fields.
ROLES: dict[str, Role] = {
    # field                   flag                  free   compared  on resume
    "model":             Role("the model",          False, False,    "fixed"),
    "shortcut":          Role("--shortcut",         False, False,    "fixed"),
    "iters":             Role("--iters",            False, True,     "fixed"),
    "milestones":        Role("--milestones",       False, True,     "fixed"),
    "lr":                Role("--lr",               False, True,     "fixed"),
    "warmup_iters":      Role("--warmup-iters",     False, True,     "fixed"),
    "warmup_lr":         Role("the warm-up lr",     False, True,     "fixed"),
    "momentum":          Role("--momentum",         False, True,     "fixed"),
    "weight_decay":      Role("--wd",               False, True,     "fixed"),
    "batch_size":        Role("--batch-size",       False, True,     "fixed"),
    "seed":              Role("--seed",             True,  False,    "fixed"),
    "dataset":           Role("--dataset",          False, True,     "fixed"),
    "data":              Role("--data",             False, True,     "fixed"),
    "val_split":         Role("--val-split",        False, True,     "fixed"),
    "normalize":         Role("--normalize",        False, True,     "fixed"),
    "loader":            Role("--loader",           False, False,    "fixed"),
    "device":            Role("--device",           False, False,    "given"),
    "amp":               Role("--amp",              False, False,    "fixed"),
    "amp_dtype":         Role("--amp-dtype",        False, False,    "fixed"),
    "precision":         Role("the precision",      False, True,     "found"),
    "channels_last":     Role("--channels-last",    False, False,    "fixed"),
    "compile":           Role("--compile",          False, False,    "fixed"),
    "deterministic":     Role("--deterministic",    False, False,    "fixed"),
    "cpu_threads":       Role("the CPU threads",    False, False,    "found"),
    "eval_every":        Role("--eval-every",       False, False,    "fixed"),
    "eval_batch_size":   Role("--eval-batch-size",  False, False,    "fixed"),
    "log_every":         Role("--log-every",        False, False,    "fixed"),
    "checkpoint_every":  Role("--checkpoint-every", False, False,    "fixed"),
    "out":               Role("--out",              True,  False,    "fixed"),
    "progress":          Role("--progress",         False, False,    "given"),
    "extra":             Role("the extra labels",   False, False,    "fixed"),
}


def flag(name: str) -> str:
    """How a message names a field: its option, or words where no option sets it."""
    return ROLES[name].flag


def free_in_group() -> tuple[str, ...]:
    """The fields the runs of one fused group may differ in."""
    return tuple(name for name, role in ROLES.items() if role.free)


def comparable() -> tuple[str, ...]:
    """The fields a report compares runs of one model on before it averages them."""
    return tuple(name for name, role in ROLES.items() if role.compared)


def resume_overrides() -> tuple[str, ...]:
    """The fields `--resume` may be given again: they change no result."""
    return tuple(name for name, role in ROLES.items() if role.on_resume == "given")


def recorded() -> tuple[str, ...]:
    """The fields a run fills in at its start (what it found, not what was asked)."""
    return tuple(name for name, role in ROLES.items() if role.on_resume == "found")


def validate(cfg: RunConfig) -> RunConfig:
    """Raise UsageError on anything a run cannot use; return the config unchanged."""
    spec = cfg.spec
    if (spec.name, spec.shortcut) != (cfg.model, cfg.shortcut):
        raise UsageError(f"the config names {cfg.model} with shortcut {cfg.shortcut}: expected "
                         f"model={spec.name}, shortcut={spec.shortcut}")
    for name in ("lr", "warmup_lr", "momentum", "weight_decay"):
        if not math.isfinite(getattr(cfg, name)) or abs(getattr(cfg, name)) > FLOAT32_MAX:
            raise UsageError(f"{flag(name)} must be a finite number within float32's range "
                             f"(|x| <= {FLOAT32_MAX:.3g}, the weights' type), got {getattr(cfg, name)}")
    if not 0 <= cfg.seed < 2**32:
        raise UsageError(f"--seed must be between 0 and 2**32 - 1 (what the data order's generator takes), "
                         f"got {cfg.seed}")
    for name in ("iters", "batch_size", "eval_every", "eval_batch_size", "log_every", "checkpoint_every"):
        if getattr(cfg, name) <= 0:
            raise UsageError(f"{flag(name)} must be positive, got {getattr(cfg, name)}")
    ms = cfg.milestones
    if any(m <= 0 for m in ms) or any(b <= a for a, b in zip(ms, ms[1:], strict=False)):
        raise UsageError(f"--milestones must be positive and strictly increasing, got {list(ms)}")
    if cfg.lr <= 0 or cfg.warmup_lr <= 0 or cfg.warmup_iters < 0:
        raise UsageError("--lr and the warm-up lr must be positive and --warmup-iters not negative")
    if not 0 <= cfg.momentum < 1 or cfg.weight_decay < 0:
        raise UsageError("--momentum must be in [0, 1) and --wd not negative")
    if cfg.precision is not None and cfg.precision not in PRECISIONS:
        raise UsageError(f"precision {cfg.precision!r}: expected one of {', '.join(PRECISIONS)}")
    if cfg.dataset not in DATASETS:
        raise UsageError(f"unknown dataset {cfg.dataset!r}: choose one of {', '.join(DATASETS)}")
    for name, choices in (("normalize", NORMALIZATIONS), ("loader", LOADERS), ("amp_dtype", AMP_DTYPES),
                          ("progress", PROGRESS)):
        if getattr(cfg, name) not in choices:
            raise UsageError(f"{name} {getattr(cfg, name)!r}: expected one of {', '.join(choices)}")
    if cfg.val_split < 0:
        raise UsageError(f"--val-split must be 0 or more, got {cfg.val_split}")
    return cfg


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m fastres.train", description="Train a CIFAR-10 ResNet or plain net "
                "with the recipe of He et al. 2016 (defaults are the paper's).")
    p.add_argument("model", nargs="?", help="resnet20/32/44/56/110/1202, plain20/32/44/56/110, or any depth 6n+2; "
                   "resnet56:B names the shortcut option too")
    p.add_argument("--shortcut", choices=SHORTCUTS, help="ResNet shortcut option (default A)")
    p.add_argument("--iters", type=int, help=f"training iterations (default {recipe.ITERS})")
    p.add_argument("--milestones", type=_int_list, help=f"iterations where lr is divided by {recipe.LR_DROP:g} "
                   f"(default {','.join(map(str, recipe.MILESTONES))})")
    p.add_argument("--lr", type=float, help=f"base learning rate (default {recipe.LR})")
    p.add_argument("--warmup-iters", type=int, help=f"iterations at lr {recipe.WARMUP_LR} first (default "
                   f"{recipe.WARMUP_ITERS} for depth >= {recipe.WARMUP_MIN_DEPTH}, else 0)")
    p.add_argument("--momentum", type=float, help=f"SGD momentum (default {recipe.MOMENTUM})")
    p.add_argument("--wd", dest="weight_decay", type=float, help=f"weight decay (default {recipe.WEIGHT_DECAY:g})")
    p.add_argument("--batch-size", type=int, help=f"global batch size (default {recipe.BATCH_SIZE})")
    p.add_argument("--seed", type=int)
    p.add_argument("--seeds", type=_int_list, help="several runs, one per seed (e.g. 0,1,2,3,4), each in its own run "
                   "directory; fused into one training step where that is faster (see --fuse)")
    p.add_argument("--fuse", choices=FUSE, help="train the --seeds runs as one fused step: auto (default: on a GPU; "
                   "on a CPU, where fusing measured slower, one after another), on, or off")
    p.add_argument("--dataset", choices=tuple(DATASETS), help="cifar10 (default) or cifar100 (its 100 fine labels)")
    p.add_argument("--data", help="CIFAR-10 archive, image tree or folder (default: the official archive, "
                   "downloaded to the cache)")
    p.add_argument("--val-split", type=int, help="hold out this many training images as validation (default 0)")
    p.add_argument("--normalize", choices=NORMALIZATIONS,
                   help=f"per-pixel mean (the paper's) or per-channel mean/std (default {recipe.NORMALIZE})")
    p.add_argument("--loader", choices=LOADERS, help="input pipeline (default torch)")
    p.add_argument("--device", help="auto (cuda if present), cpu, cuda, cuda:N")
    p.add_argument("--amp", action="store_true", default=None, help="mixed precision with torch.amp")
    p.add_argument("--amp-dtype", choices=AMP_DTYPES,
                   help="auto (default: bf16 where the device computes it natively, else fp16 on a GPU and "
                   "fp32 on a CPU), bf16, or fp16 (with a GradScaler)")
    p.add_argument("--channels-last", action="store_true", default=None)
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the model (with CUDA graphs on a GPU)")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="deterministic cuDNN/torch algorithms: a GPU run repeats bit for bit (slower)")
    p.add_argument("--eval-every", type=int, help="evaluate every N iterations (default 2000)")
    p.add_argument("--eval-batch-size", type=int, help="evaluation batch (default 1000; changes no result)")
    p.add_argument("--log-every", type=int, help="read metrics every N iterations (default 100)")
    p.add_argument("--checkpoint-every", type=int, help="checkpoint every N iterations (default 2000)")
    p.add_argument("--out", help="run directory (default runs/<model>[-<shortcut>]-seed<seed>); with --seeds, the "
                   "folder that holds one such directory per seed")
    p.add_argument("--progress", choices=PROGRESS, help="rich bar, plain log lines, or none (default auto)")
    p.add_argument("--resume", metavar="RUN_DIR", nargs="+", help="continue the run in RUN_DIR exactly where it "
                   "stopped; a run trained fused resumes with its whole group")
    return p


def run_name(spec: ModelSpec, dataset: str, seed: int) -> str:
    """The default name of a run's directory: `resnet56-A-seed0`, `cifar100-plain20-seed3`."""
    prefix = "" if dataset == "cifar10" else f"{dataset}-"
    return f"{prefix}{spec.tag}-seed{seed}"


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """A validated RunConfig from parsed arguments; unset options keep the defaults."""
    if not args.model:
        raise UsageError("a model is required (e.g. resnet56), or --resume RUN_DIR")
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("model", "resume", "seeds", "fuse")}
    spec = parse_spec(args.model, given.get("shortcut"))
    given.update(model=spec.name, shortcut=spec.shortcut)
    given.setdefault("warmup_iters", recipe.default_warmup_iters(spec.depth))
    given.setdefault("out", str(Path("runs") / run_name(spec, given.get("dataset", "cifar10"), given.get("seed", 0))))
    if given.get("data"):  # saved absolute, so `--resume` works from any folder
        given["data"] = os.path.abspath(given["data"])
    return validate(RunConfig(**given))


def configs_from_args(args: argparse.Namespace) -> list[RunConfig]:
    """One config per run: `--seeds 0,1,2` gives three, alike but for the seed, each in its
    own directory (named as a single run's, under `--out` when given)."""
    if args.seeds is None:
        if args.fuse is not None:
            raise UsageError("--fuse says how to train the runs of --seeds (or of a resumed group): give --seeds")
        return [config_from_args(args)]
    if args.seed is not None:
        raise UsageError("--seed and --seeds: give one of them")
    if not args.seeds or len(set(args.seeds)) < len(args.seeds):
        raise UsageError(f"--seeds must list distinct seeds, got {list(args.seeds)}")
    folder, cfgs = Path(args.out or "runs"), []
    for seed in args.seeds:
        cfg = config_from_args(argparse.Namespace(**{**vars(args), "seed": seed, "seeds": None, "out": None}))
        cfgs.append(dataclasses.replace(cfg, out=str(folder / Path(cfg.out).name)))  # the single run's name
    return cfgs


def parse_spec(text: str, shortcut: str | None = None) -> ModelSpec:
    """ModelSpec.parse, with its message as a usage error."""
    from fastres.models import ModelSpec  # here: the models import torch, which --help does without

    try:
        return ModelSpec.parse(text, shortcut)
    except ValueError as e:
        raise UsageError(str(e)) from None
