"""One frozen dataclass describes a run; argparse fills it; every checkpoint and result
carries it, so any figure can be traced back to the run that made it."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import numbers
import os
from collections.abc import Iterator
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
    val_seed: int = 0  # chooses the --val-split images, the same for every run of a group or sweep
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
        if "val_seed" not in d:  # saved before --val-seed: its seed chose its split
            values["val_seed"] = values.get("seed", 0)
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
    "iters":             Role("--iters",            True,  True,     "fixed"),
    "milestones":        Role("--milestones",       True,  True,     "fixed"),
    "lr":                Role("--lr",               True,  True,     "fixed"),
    "warmup_iters":      Role("--warmup-iters",     True,  True,     "fixed"),
    "warmup_lr":         Role("--warmup-lr",        True,  True,     "fixed"),
    "momentum":          Role("--momentum",         True,  True,     "fixed"),
    "weight_decay":      Role("--wd",               True,  True,     "fixed"),
    "batch_size":        Role("--batch-size",       False, True,     "fixed"),
    "seed":              Role("--seed",             True,  False,    "fixed"),
    "dataset":           Role("--dataset",          False, True,     "fixed"),
    "data":              Role("--data",             False, True,     "fixed"),
    "val_split":         Role("--val-split",        False, True,     "fixed"),
    "val_seed":          Role("--val-seed",         False, True,     "fixed"),
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
    for name in ("seed", "val_seed"):
        if not 0 <= getattr(cfg, name) < 2**32:
            raise UsageError(f"{flag(name)} must be between 0 and 2**32 - 1 (what the data's generators take), "
                             f"got {getattr(cfg, name)}")
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
    p.add_argument("--warmup-lr", type=float, help=f"the warm-up's learning rate (default {recipe.WARMUP_LR})")
    p.add_argument("--momentum", type=float, help=f"SGD momentum (default {recipe.MOMENTUM})")
    p.add_argument("--wd", dest="weight_decay", type=float, help=f"weight decay (default {recipe.WEIGHT_DECAY:g})")
    p.add_argument("--batch-size", type=int, help=f"global batch size (default {recipe.BATCH_SIZE})")
    p.add_argument("--seed", type=int)
    p.add_argument("--seeds", type=_int_list, help="several runs, one per seed (e.g. 0,1,2,3,4), each in its own run "
                   "directory; fused into one training step where that is faster (see --fuse)")
    p.add_argument("--sweep", action="append", metavar="KEY=V1,V2", help="several runs, one per value (repeat for "
                   "a grid: the runs are the product, times --seeds), each in its own run directory named by its "
                   f"values; KEY is one of {', '.join(SWEEPS)} (milestones as 16000:24000). Choose on --val-split's "
                   "validation error: python -m fastres.report RUNS --select val")
    p.add_argument("--group-size", type=int, help="at most this many runs in one fused group (default: all)")
    p.add_argument("--fuse", choices=FUSE, help="train the --seeds runs as one fused step: auto (default: on a GPU; "
                   "on a CPU, where fusing measured slower, one after another), on, or off")
    p.add_argument("--dataset", choices=tuple(DATASETS), help="cifar10 (default) or cifar100 (its 100 fine labels)")
    p.add_argument("--data", help="CIFAR-10 archive, image tree or folder (default: the official archive, "
                   "downloaded to the cache)")
    p.add_argument("--val-split", type=int, help="hold out this many training images as validation (default 0)")
    p.add_argument("--val-seed", type=int, help="which images --val-split holds out (default 0): one split for "
                   "every run of a sweep or group, whatever its seed")
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


def run_name(spec: ModelSpec, dataset: str, seed: int, swept: tuple[str, ...] = ()) -> str:
    """The default name of a run's directory: `resnet56-A-seed0`, `cifar100-plain20-seed3`,
    and for a run of a sweep its values: `resnet20-A-lr0.05-wd0.0005-seed1`."""
    prefix = "" if dataset == "cifar10" else f"{dataset}-"
    return "-".join([f"{prefix}{spec.tag}", *swept, f"seed{seed}"])


@dataclass(frozen=True)
class Sweepable:
    """A hyperparameter `--sweep` can vary: the field it sets and how one value is read."""

    field: str
    kind: type  # float, int, or tuple (milestones: 16000:24000)

    def parse(self, key: str, text: str) -> Any:
        try:
            if self.kind is tuple:
                return tuple(int(v) for v in text.split(":"))
            return self.kind(text)
        except ValueError:
            what = {float: "a number", int: "an integer", tuple: "integers joined by ':' (16000:24000)"}[self.kind]
            raise UsageError(f"--sweep {key}: each value must be {what}, got {text!r}") from None

    def token(self, key: str, value: Any) -> str:
        """The value in a run directory's name: lr0.05, milestones16000_24000 (floats as their
        shortest exact form, so two values never share a name)."""
        shown = "_".join(map(str, value)) if self.kind is tuple else repr(value)
        return f"{key}{shown}"


# What may differ between the runs of a sweep: what changes neither the graph nor the data
# (both one per group: a fused group is one graph over one training set).
SWEEPS = {"lr": Sweepable("lr", float), "momentum": Sweepable("momentum", float),
          "wd": Sweepable("weight_decay", float), "warmup_lr": Sweepable("warmup_lr", float),
          "warmup_iters": Sweepable("warmup_iters", int), "milestones": Sweepable("milestones", tuple),
          "iters": Sweepable("iters", int)}


def parse_sweeps(texts: list[str], args: argparse.Namespace) -> dict[str, list[Any]]:
    """`--sweep lr=0.05,0.1 --sweep wd=1e-4,5e-4` as {"lr": [0.05, 0.1], "wd": [1e-4, 5e-4]}."""
    sweeps: dict[str, list[Any]] = {}
    for text in texts:
        key, sep, values = text.partition("=")
        key = key.strip()
        if not sep or not values.strip():
            raise UsageError(f"--sweep expects KEY=V1,V2,..., got {text!r}")
        if key not in SWEEPS:
            raise UsageError(f"--sweep {key}: not sweepable; one of {', '.join(SWEEPS)} (what changes the graph or "
                             "the data, such as the model or the batch size, is one per sweep)")
        if key in sweeps:
            raise UsageError(f"--sweep {key} is given twice: list all its values in one --sweep {key}=...")
        sweepable = SWEEPS[key]
        if getattr(args, sweepable.field, None) is not None:
            raise UsageError(f"{flag(sweepable.field)} and --sweep {key}: give one of them")
        parsed = [sweepable.parse(key, v.strip()) for v in values.split(",")]
        twice = sorted({sweepable.token(key, v) for v in parsed if parsed.count(v) > 1})  # 0.1 and 0.10 too
        if twice:
            raise UsageError(f"--sweep {key} lists a value twice ({', '.join(twice)})")
        sweeps[key] = parsed
    return sweeps


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """A validated RunConfig from parsed arguments; unset options keep the defaults."""
    if not args.model:
        raise UsageError("a model is required (e.g. resnet56), or --resume RUN_DIR")
    given = {k: v for k, v in vars(args).items()
             if v is not None and k not in ("model", "resume", "seeds", "fuse", "sweep", "group_size")}
    spec = parse_spec(args.model, given.get("shortcut"))
    given.update(model=spec.name, shortcut=spec.shortcut)
    given.setdefault("warmup_iters", recipe.default_warmup_iters(spec.depth))
    given.setdefault("out", str(Path("runs") / run_name(spec, given.get("dataset", "cifar10"), given.get("seed", 0))))
    if given.get("data"):  # saved absolute, so `--resume` works from any folder
        given["data"] = os.path.abspath(given["data"])
    return validate(RunConfig(**given))


def configs_from_args(args: argparse.Namespace) -> list[RunConfig]:
    """One config per run: `--seeds 0,1,2` gives three, alike but for the seed; `--sweep`
    gives one per value (the product of several sweeps), times the seeds. Each run has its
    own directory (named as a single run's, with its swept values, under `--out` when
    given); the runs of a sweep record it in their config (`extra["sweep"]`)."""
    sweeps = parse_sweeps(args.sweep or [], args)
    if args.seeds is None and not sweeps:
        if args.fuse is not None or args.group_size is not None:
            raise UsageError("--fuse and --group-size say how to train the runs of --seeds or --sweep (or of a "
                             "resumed group): give --seeds or --sweep")
        return [config_from_args(args)]
    if args.group_size is not None and args.group_size < 1:
        raise UsageError(f"--group-size must be at least 1, got {args.group_size}")
    if args.seeds is not None and args.seed is not None:
        raise UsageError("--seed and --seeds: give one of them")
    if args.seeds is not None and (not args.seeds or len(set(args.seeds)) < len(args.seeds)):
        raise UsageError(f"--seeds must list distinct seeds, got {list(args.seeds)}")
    folder, cfgs = Path(args.out or "runs"), []
    for setting, swept, seed in sweep_runs(sweeps, args.seeds if args.seeds is not None else [args.seed or 0]):
        ns = argparse.Namespace(**{**vars(args), **setting, "seed": seed, "seeds": None, "sweep": None, "out": None})
        cfg = config_from_args(ns)
        name = run_name(cfg.spec, cfg.dataset, seed, swept)
        cfgs.append(dataclasses.replace(cfg, out=str(folder / name), extra={**cfg.extra, **sweep_record(sweeps)}))
    return cfgs


def sweep_runs(sweeps: dict[str, list[Any]], seeds: list[int]) -> Iterator[tuple[dict[str, Any], tuple[str, ...], int]]:
    """Each run of a sweep (no sweep: one per seed): the fields it sets, the words naming
    its values in its directory's name, its seed. The seeds vary fastest."""
    for values in itertools.product(*sweeps.values()):
        pairs = list(zip(sweeps, values, strict=True))
        for seed in seeds:
            yield {SWEEPS[k].field: v for k, v in pairs}, tuple(SWEEPS[k].token(k, v) for k, v in pairs), seed


def sweep_record(sweeps: dict[str, list[Any]]) -> dict[str, Any]:
    """What a run of a sweep keeps in its config's `extra`: the whole sweep (nothing without one)."""
    if not sweeps:
        return {}
    return {"sweep": {k: [list(v) if isinstance(v, tuple) else v for v in vs] for k, vs in sweeps.items()}}


def parse_spec(text: str, shortcut: str | None = None) -> ModelSpec:
    """ModelSpec.parse, with its message as a usage error."""
    from fastres.models import ModelSpec  # here: the models import torch, which --help does without

    try:
        return ModelSpec.parse(text, shortcut)
    except ValueError as e:
        raise UsageError(str(e)) from None
