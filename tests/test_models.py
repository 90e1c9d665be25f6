import math

import pytest
import torch

from fastres import models
from fastres.errors import RunError
from fastres.models import (
    BasicBlock,
    ModelSpec,
    ShortcutA,
    build_model,
    count_parameters,
    list_models,
    plain,
    resnet,
)

# He et al. 2016 Sec. 4.2 architectures; counts include BN's gamma and beta.
COUNTS_A = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962, 1202: 19_421_274}
COUNTS_B = {20: 272_474, 56: 855_770}
COUNTS_C = {20: 283_962, 56: 900_858}


@pytest.mark.parametrize("depth", COUNTS_A)
def test_option_a_and_plain_counts(depth: int) -> None:
    assert count_parameters(build_model(f"resnet{depth}")) == COUNTS_A[depth] == \
        ModelSpec.parse(f"resnet{depth}").parameter_count()
    if depth != 1202:
        assert count_parameters(build_model(f"plain{depth}")) == COUNTS_A[depth]


@pytest.mark.parametrize("depth", COUNTS_B)
def test_option_b_and_c_counts(depth: int) -> None:
    assert count_parameters(build_model(f"resnet{depth}", "B")) == COUNTS_B[depth]
    assert count_parameters(build_model(f"resnet{depth}", "C")) == COUNTS_C[depth]


@pytest.mark.parametrize("name", ["resnet8", "resnet8:B", "resnet8:C", "plain8", "resnet14:B", "resnet110:C"])
@pytest.mark.parametrize("classes", [10, 100])
def test_the_count_from_the_depth_is_the_built_models(name: str, classes: int) -> None:
    spec = ModelSpec.parse(name)
    assert spec.parameter_count(classes) == count_parameters(spec.build(classes))


def test_a_model_that_cannot_fit_is_refused_before_it_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """resnet2000000 has 32 billion parameters: refused from its depth alone, in one line,
    whatever the machine (the memory is fixed here at 24 GiB, this project's machines')."""
    monkeypatch.setattr(models, "memory_bytes", lambda device: 24 * 2**30)
    monkeypatch.setattr(models, "CifarResNet", lambda *a: pytest.fail("built a model that cannot fit"))
    spec = ModelSpec.parse("resnet2000000")
    assert spec.parameter_count() == 32_405_279_002
    with pytest.raises(RunError, match=r"resnet2000000 \(32,405,279,002 parameters\) needs at least 120.7 GiB and"):
        spec.build()
    # To train: weights, gradients and momentum, and at least one saved activation per conv
    # output: ResNet-1202 at batch 128 in fp32, 3 x 19.4M x 4 B + 128 x 11.5M x 4 B = 5.7 GiB at least.
    big = ModelSpec.parse("resnet1202")
    with pytest.raises(RunError, match="needs at least 5.7 GiB to train at batch 128 and this device has 4.0 GiB"):
        big.check_fits(4 * 2**30, batch_size=128)
    big.check_fits(24 * 2**30, batch_size=128)  # a lower bound: what could fit is never refused


def test_list_models_are_the_papers() -> None:
    assert list_models() == ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202",
                             "plain20", "plain32", "plain44", "plain56", "plain110"]


@pytest.mark.parametrize("name", ["resnet20", "plain20", "resnet8", "resnet26"])
def test_output_shape_and_layer_count(name: str) -> None:
    model = build_model(name)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    weighted = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    assert len(weighted) == model.depth  # 6n+2 weighted layers; option A adds none


@pytest.mark.parametrize(("shortcut", "convs"), [("A", 55), ("B", 57), ("C", 55 + 27)])
def test_resnet56_convolutions_and_bns(shortcut: str, convs: int) -> None:
    """What fastres.step's compile note counts: depth - 1 = 55 convolutions with option A
    (its shortcuts have none), plus one per projection shortcut with B (2) and C (27), and a
    BN after every convolution."""
    model = resnet(56, shortcut)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == convs
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == convs


def test_stage_shapes() -> None:
    model = resnet(20)
    x = torch.relu(model.bn1(model.conv1(torch.randn(1, 3, 32, 32))))
    for stage, (c, hw) in zip((model.stage1, model.stage2, model.stage3), ((16, 32), (32, 16), (64, 8)), strict=True):
        x = stage(x)
        assert x.shape == (1, c, hw, hw)


def test_option_a_pads_zeros_and_subsamples() -> None:
    sc = ShortcutA(16, 32, stride=2)
    x = torch.randn(2, 16, 32, 32)
    y = sc(x)
    assert y.shape == (2, 32, 16, 16)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, 16:]) == 0
    assert list(sc.parameters()) == []
    assert "16->32" in repr(sc)


def test_shortcut_placement() -> None:
    a, b, c = (resnet(20, s) for s in "ABC")
    assert isinstance(a.stage2[0].shortcut, ShortcutA) and isinstance(a.stage2[1].shortcut, torch.nn.Identity)
    assert isinstance(b.stage2[0].shortcut, torch.nn.Sequential) and isinstance(b.stage1[0].shortcut, torch.nn.Identity)
    assert all(isinstance(blk.shortcut, torch.nn.Sequential) for blk in c.modules() if isinstance(blk, BasicBlock))


def test_plain_has_no_shortcuts() -> None:
    net = plain(20)
    blocks = [m for m in net.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 9 and all(b.shortcut is None for b in blocks)
    # With the second BN zeroed, a residual block passes relu(x) on; a plain block outputs zeros.
    blk = blocks[1]
    torch.nn.init.zeros_(blk.bn2.weight)
    assert torch.count_nonzero(blk.eval()(torch.rand(1, 16, 32, 32))) == 0


def test_he_init() -> None:
    conv = resnet(56).stage3[1].conv1  # 64 * 64 * 9 weights
    expected = math.sqrt(2 / (3 * 3 * 64))  # fan_out, as in the authors' code
    # The std of N = 36,864 normal draws is within 1/sqrt(2N) = 0.37% of the true one at one
    # standard deviation: 3% is eight of them, whatever the generator's output on this CPU.
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.03)
    assert torch.all(resnet(20).fc.bias == 0)


@pytest.mark.parametrize("name", ["resnet21", "resnet", "vgg16", "plain7", "resnet2"])
def test_bad_names(name: str) -> None:
    with pytest.raises(ValueError):
        build_model(name)


def test_bad_shortcut() -> None:
    with pytest.raises(ValueError, match="shortcut"):
        build_model("resnet20", "D")
    with pytest.raises(ValueError, match="plain"):
        build_model("plain20", "B")
