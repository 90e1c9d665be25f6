import copy

import torch

from fastres.models import build_model
from fastres.optim import make_optimizer
from fastres.step import TrainStep, _predictions, error_rate

CPU = torch.device("cpu")


def test_step_returns_device_tensors_and_the_set_lr_drives_the_update() -> None:
    """The first SGD step moves every weight by lr * (grad + wd * w) (no momentum yet), so
    the same step at twice the learning rate moves each weight twice as far. In float64 the
    only difference is the rounding of w - lr * d and of the difference taken: at most 2 ulps
    of |w| each way. (Eager against compiled steps: the GPU check's agreement part, rehearsed
    in tests/test_gpu_check.py.)"""
    torch.manual_seed(0)
    base = build_model("resnet8").double()
    x, y = torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.arange(8) % 10
    moved = {}
    for lr in (0.01, 0.02):
        model = copy.deepcopy(base)
        step = TrainStep(model, CPU, None, False)
        step.set_lr(lr)
        loss, wrong = step(x, y)
        assert loss.shape == wrong.shape == (1,) and loss.requires_grad is False and wrong.dtype == torch.int64
        moved[lr] = model.conv1.weight.detach() - base.conv1.weight.detach()
    assert moved[0.01].abs().max() > 0
    ulp = torch.finfo(torch.float64).eps * base.conv1.weight.detach().abs().max()
    torch.testing.assert_close(moved[0.02], 2 * moved[0.01], rtol=0, atol=4 * ulp)


class _Batches:
    steps_per_epoch = 2

    def epoch(self, epoch: int, start: int = 0):
        g = torch.Generator().manual_seed(0)
        for n in (5, 3):
            yield torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 10


def test_error_rate_counts_every_image_in_eval_mode() -> None:
    model = build_model("resnet8")
    preds = torch.cat([model.eval()(x).argmax(1) for x, _ in _Batches().epoch(0)])
    labels = torch.cat([y for _, y in _Batches().epoch(0)])
    model.train()
    assert error_rate(model, _Batches(), CPU, None) == (preds != labels).sum().item() / 8
    assert model.training


def test_evaluation_runs_the_compiled_forward_on_a_cpu_and_the_eager_model_on_cuda() -> None:
    """On CUDA a compiled model's eval-mode graph is never compiled nor captured (see
    `_predictions`); here the CPU tensors stand in, told that the device is CUDA."""
    model, called = build_model("resnet8"), []

    def forward(x: torch.Tensor) -> torch.Tensor:
        called.append(len(x))
        return model(x)

    for device, expected in ((CPU, [5, 3]), (torch.device("cuda"), [])):
        called.clear()
        list(_predictions(model, _Batches(), device, None, forward))
        assert called == expected


def test_optimizer_is_the_papers() -> None:
    model = build_model("resnet8")
    opt = make_optimizer(model, CPU, None)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (0.1, 0.9, 1e-4, False)
    assert sum(p.numel() for p in group["params"]) == 75_290  # weight decay on every parameter, BN included
