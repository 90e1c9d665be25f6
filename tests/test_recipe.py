"""The paper's recipe (fastres.recipe) is the config's defaults and its help; the step's
optimiser is held to it in tests/test_step.py, the schedule in tests/test_schedule.py."""

from fastres import recipe
from fastres.config import RunConfig, build_parser
from fastres.data.dataset import IMAGE_SHAPE


def test_the_crop_is_the_original_image_size() -> None:
    assert recipe.CROP == IMAGE_SHAPE[0] == IMAGE_SHAPE[1]


def test_a_default_run_is_the_papers() -> None:
    cfg = RunConfig(model="resnet20", shortcut="A")
    assert (cfg.iters, cfg.milestones, cfg.lr, cfg.warmup_lr, cfg.momentum, cfg.weight_decay, cfg.batch_size,
            cfg.normalize) == (64_000, (32_000, 48_000), 0.1, 0.01, 0.9, 1e-4, 128, "pixel")


def test_the_help_states_the_recipe() -> None:
    text = " ".join(build_parser().format_help().split())
    for default in ("(default 64000)", "divided by 10 (default 32000,48000)", "(default 0.1)", "lr 0.01 first",
                    "(default 400 for depth >= 110, else 0)", "(default 0.9)", "(default 0.0001)", "(default 128)",
                    "(default pixel)"):
        assert default in text, default
