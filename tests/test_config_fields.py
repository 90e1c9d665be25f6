"""Every RunConfig field states its roles (config.ROLES), and what is derived from them is
spelled out here, so that a new field or a changed role is a deliberate edit of this file."""

import dataclasses

import pytest

from fastres import config
from fastres.config import FIELD_TYPES, ROLES, RunConfig, build_parser


def test_every_field_has_every_role_in_the_dataclass_order() -> None:
    assert list(ROLES) == [f.name for f in dataclasses.fields(RunConfig)]
    for name, role in ROLES.items():
        assert isinstance(role.flag, str) and role.flag, name
        assert isinstance(role.free, bool) and isinstance(role.compared, bool), name
        assert role.on_resume in ("fixed", "given", "found"), name


def test_each_flag_is_the_option_that_sets_its_field() -> None:
    """A field's flag is an option of the command line whose dest is that field; a field
    named in words is one that no option sets."""
    options = {}
    for action in build_parser()._actions:
        for option in action.option_strings:
            options.setdefault(action.dest, set()).add(option)
    for name, role in ROLES.items():
        if role.flag.startswith("--"):
            assert role.flag in options.get(name, set()), (name, role.flag)
        else:
            assert name not in options, (name, options.get(name))
    assert config.flag("weight_decay") == "--wd" and config.flag("warmup_lr") == "--warmup-lr"
    assert config.flag("precision") == "the precision"


def test_the_derived_lists() -> None:
    assert config.free_in_group() == ("iters", "milestones", "lr", "warmup_iters", "warmup_lr", "momentum",
                                      "weight_decay", "seed", "out")
    assert {s.field for s in config.SWEEPS.values()} | {"seed", "out"} == set(config.free_in_group())
    assert config.comparable() == ("iters", "milestones", "lr", "warmup_iters", "warmup_lr", "momentum",
                                   "weight_decay", "batch_size", "dataset", "data", "val_split", "val_seed",
                                   "normalize", "precision")
    assert config.resume_overrides() == ("device", "progress")
    assert config.recorded() == ("precision", "cpu_threads")


def test_every_field_has_a_checked_type_when_read_back() -> None:
    """A saved config (config.json, a checkpoint's) is read field by field against its
    annotation: every annotation has its check, and a value of another type is refused."""
    assert {f.type for f in dataclasses.fields(RunConfig)} <= set(FIELD_TYPES)
    saved = RunConfig(model="resnet8", shortcut="A").to_dict()
    assert RunConfig.from_dict(saved) == RunConfig(model="resnet8", shortcut="A")
    for f in dataclasses.fields(RunConfig):
        with pytest.raises(ValueError, match=f"field {f.name!r} should be"):
            RunConfig.from_dict({**saved, f.name: object()})


def test_the_config_names_the_precisions_the_runtime_has_and_imports_no_torch() -> None:
    """`fastres train --help` builds this module's parser without importing torch."""
    import subprocess
    import sys

    from fastres import runtime

    assert tuple(runtime.PRECISIONS) == config.PRECISIONS
    code = "import sys, fastres.config; fastres.config.build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
