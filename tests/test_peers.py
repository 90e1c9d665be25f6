"""Importing akamaster/pytorch_resnet_cifar10 checkpoints: the mapped model computes the
peer's function exactly. The peer's layout and forward are written here (no download)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastres import peers
from fastres.cli import run_main
from fastres.data import loaders
from fastres.evaluate import main as evaluate_main


def peer_state(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random state dict with the keys of the peer's published files (checked against
    resnet20-12fca82f.th and resnet56-4bfd9763.th): DataParallel's `module.` prefix, layerK,
    conv1/conv2, bn1/bn2, linear, BN running statistics, 97 tensors for ResNet-20."""
    def conv(cout: int, cin: int) -> torch.Tensor:
        return torch.randn(cout, cin, 3, 3, generator=generator) * (2 / (9 * cin)) ** 0.5

    def bn(prefix: str, c: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1 + 0.1 * torch.randn(c, generator=generator),
                f"{prefix}.bias": 0.1 * torch.randn(c, generator=generator),
                f"{prefix}.running_mean": 0.1 * torch.randn(c, generator=generator),
                f"{prefix}.running_var": 1 + 0.1 * torch.rand(c, generator=generator)}  # no num_batches_tracked:
    # the published files were saved by a PyTorch older than that buffer
    sd = {"conv1.weight": conv(16, 3), **bn("bn1", 16)}
    cin = 16
    for layer, planes in enumerate((16, 32, 64), start=1):
        for b in range(n):
            key = f"layer{layer}.{b}"
            sd |= {f"{key}.conv1.weight": conv(planes, cin), **bn(f"{key}.bn1", planes),
                   f"{key}.conv2.weight": conv(planes, planes), **bn(f"{key}.bn2", planes)}
            cin = planes
    sd |= {"linear.weight": 0.1 * torch.randn(10, 64, generator=generator), "linear.bias": torch.zeros(10)}
    return {f"module.{k}": v for k, v in sd.items()}


def peer_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, n: int) -> torch.Tensor:
    """The peer's ResNet forward in eval mode, as its resnet.py computes it."""
    w = {k.removeprefix("module."): v for k, v in sd.items()}

    def bn(t: torch.Tensor, p: str) -> torch.Tensor:
        return F.batch_norm(t, w[f"{p}.running_mean"], w[f"{p}.running_var"], w[f"{p}.weight"], w[f"{p}.bias"])
    out = F.relu(bn(F.conv2d(x, w["conv1.weight"], padding=1), "bn1"))
    cin = 16
    for layer, planes in enumerate((16, 32, 64), start=1):
        for b in range(n):
            key, stride = f"layer{layer}.{b}", 2 if (b == 0 and layer > 1) else 1
            y = F.relu(bn(F.conv2d(out, w[f"{key}.conv1.weight"], stride=stride, padding=1), f"{key}.bn1"))
            y = bn(F.conv2d(y, w[f"{key}.conv2.weight"], padding=1), f"{key}.bn2")
            if stride != 1 or cin != planes:  # option A, the peer's way: planes//4 zero channels on each side
                short = F.pad(out[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))
            else:
                short = out
            out, cin = F.relu(y + short), planes
    out = F.avg_pool2d(out, out.size(3)).flatten(1)
    return F.linear(out, w["linear.weight"], w["linear.bias"])


@pytest.mark.parametrize("n", [1, 3])
def test_mapped_model_computes_the_peers_function(tmp_path: Path, n: int) -> None:
    g = torch.Generator().manual_seed(n)
    sd = peer_state(n, g)
    path = tmp_path / f"resnet{6 * n + 2}-12fca82f.th"
    torch.save({"epoch": 200, "best_prec1": 91.7, "state_dict": sd}, path)
    assert n != 3 or len(sd) == 97
    model, mean, std = peers.akamaster(path)
    assert model.depth == 6 * n + 2 and mean.shape == (1, 1, 3) and std.tolist()[0][0][0] == pytest.approx(0.229)
    x = torch.randn(5, 3, 32, 32, generator=g, dtype=torch.float64)
    model, sd = model.double(), {k: v.double() for k, v in sd.items()}
    # The same layers in float64 (option A's padding is exact), so only the summation order
    # may differ: at most n*u per sum of n <= 64*9 terms (u = 1.1e-16), 6e-14 of the terms'
    # magnitude, over 6n+2 layers that BN keeps at unit scale: inside 1e-12 for n <= 3.
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), peer_forward(sd, x, n), rtol=1e-12, atol=1e-12)
        # fastres' own padding would not: the import really is needed
        for m in model.modules():
            if isinstance(m, peers.ShortcutA):
                m.front = 0
        assert not torch.allclose(model(x), peer_forward(sd, x, n), atol=1e-3)


def test_evaluate_imports_the_peer_checkpoint(tmp_path: Path, tiny_tree: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "resnet8.th"
    torch.save({"state_dict": peer_state(1, torch.Generator().manual_seed(0))}, path)
    loaders._prepare.cache_clear()  # nothing this process prepared before, and this test's own disk cache:
    assert run_main(evaluate_main, [str(path), "--import", "akamaster", "--data", str(tiny_tree),
                                    "--progress", "plain"]) == 0
    out = capsys.readouterr().out.splitlines()  # so the test split is decoded first, and says so
    assert out[0] == f"fastres: decoding the test images of {tiny_tree} (once: the decoded copy is cached)"
    assert out[1].startswith("fastres: decoded 40 images in ") and out[-1].startswith("resnet8-A: test error")
    bad = tmp_path / "bad.th"
    torch.save({"state_dict": {"module.conv1.weight": torch.zeros(16, 3, 3, 3)}}, bad)
    assert run_main(evaluate_main, [str(bad), "--import", "akamaster"]) == 2
    assert "not an akamaster CIFAR ResNet" in capsys.readouterr().err
