import copy

import pytest
import torch
import torch.nn.functional as F

from fastres import fused
from fastres.models import build_model
from fastres.optim import RunsSGD, make_optimizer
from fastres.schedule import lr_at
from fastres.step import TrainStep, _predictions, error_rate

CPU = torch.device("cpu")


def test_step_returns_device_tensors_and_the_set_lr_drives_the_update() -> None:
    """The first SGD step moves every weight by lr * (grad + wd * w) (no momentum yet), so
    the same step at twice the learning rate moves each weight twice as far. In float64 the
    only difference is the rounding of w - lr * d and of the difference taken: at most 2 ulps
    of |w| each way. (Eager against compiled steps, with Inductor:
    test_the_compiled_step_agrees_with_the_eager_one_in_float64.)"""
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


def _batches(n: int, dtype: torch.dtype = torch.float32, runs: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3 * runs, 32, 32, generator=g, dtype=dtype), torch.randint(0, 10, (8 * runs,), generator=g))
            for _ in range(n)]


def test_the_step_is_bit_for_bit_the_eager_loss_and_sgd_it_replaced() -> None:
    """compile=False: the `Objective` and the tensor lr change no bit of a step against the
    formula the step had (written out here: logits, cross-entropy per image, mean, backward,
    torch's SGD with a float lr)."""
    torch.manual_seed(0)
    model = build_model("resnet8")
    reference = copy.deepcopy(model)
    step = TrainStep(model, CPU, None, False)
    opt = make_optimizer(reference, CPU, None)
    for i, (x, y) in enumerate(_batches(3)):
        lr = 0.1 / (i + 1)
        step.set_lr(lr)
        losses, wrong = step(x, y)
        y = y.view(len(y), 1)
        logits = reference(x).unflatten(1, (1, -1))
        want = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y).mean(0)
        opt.zero_grad(set_to_none=True)
        want.sum().backward()
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        assert torch.equal(losses, want.detach()) and torch.equal(wrong, (logits.detach().argmax(2) != y).sum(0))
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_compiler_backend_holds_inside_its_block_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU check's rehearsal compiles with another backend (scripts/gpu_check.py); everything
    else, before and after its block, with Inductor and its modes."""
    from fastres import step

    seen = []
    monkeypatch.setattr(step.torch, "compile", lambda model, **kw: seen.append(kw) or model)
    step.compile_model(build_model("resnet8"), CPU)
    with step.compiler_backend("aot_eager"):
        TrainStep(build_model("resnet8"), CPU, None, True)
    step.compile_model(build_model("resnet8"), CPU)
    inductor = {"mode": None, "dynamic": False}
    assert seen == [inductor, *[{"backend": "aot_eager", "dynamic": False}] * 2, inductor]


def test_the_compiled_step_agrees_with_the_eager_one_in_float64() -> None:
    """Compiled and eager steps differ only in how inductor reassociates sums (convolution,
    BN statistics, the loss's mean), each a rounding of float64's eps = 1.1e-16 relative;
    over a ResNet-8's 9 layers, forward and backward, and 3 steps of momentum, amplification
    stays far below 1e6, so 1e-9 relative (and 1e-10 of the weights' scale) is a loose bound
    that a wrong formula (any difference of order lr * grad, 1e-3) cannot pass."""
    torch.manual_seed(0)
    eager_model = build_model("resnet8").double()
    compiled_model = copy.deepcopy(eager_model)
    eager, compiled = TrainStep(eager_model, CPU, None, False), TrainStep(compiled_model, CPU, None, True)
    for x, y in _batches(3, torch.float64):
        (a, wa), (b, wb) = eager(x, y), compiled(x, y)
        torch.testing.assert_close(b, a, rtol=1e-9, atol=0)
        assert torch.equal(wa, wb)
    for p, q in zip(eager_model.parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-10)


def _schedules() -> list[list[float]]:
    """The paper's schedule in miniature: drops at steps 2 and 4 of 6; and ResNet-110's
    warm-up (0.01 for 2 steps, then 0.1, a drop at 4)."""
    return [[lr_at(i, 0.1, (2, 4)) for i in range(6)],
            [lr_at(i, 0.1, (4,), warmup_iters=2, warmup_lr=0.01) for i in range(6)]]


@pytest.mark.parametrize("runs", [1, 2])
@pytest.mark.parametrize("fp16", [False, True])
def test_tensor_lrs_update_bit_for_bit_as_float_lrs(runs: int, fp16: bool) -> None:
    """Each run's update under its schedule (run k: the k-th of `_schedules`, run 0 also the
    second's warm-up when alone) against torch's SGD with float lrs on that run's own
    tensors: parameters and momentum buffers equal, across the drops. fp16: through a
    GradScaler (foreach SGD, the scaler's unscale and step)."""
    torch.manual_seed(0)
    members = [build_model("resnet8") for _ in range(runs)]
    model = fused.fuse(copy.deepcopy(members))
    amp = torch.float16 if fp16 else None
    sgd = RunsSGD(model, runs, CPU, amp, [(0.9, 1e-4)] * runs)
    refs = [make_optimizer(m, CPU, amp) for m in members]
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=fp16) for _ in range(runs + 1)]
    schedules = _schedules()[-runs:] if runs == 1 else _schedules()
    g = torch.Generator().manual_seed(2)
    for i in range(6):
        sgd.set_lr([s[i] for s in schedules])
        grads = [[torch.randn(p.shape, generator=g) for p in m.parameters()] for m in members]
        sgd.zero_grad()
        for p, *gs in zip(model.parameters(), *grads, strict=True):
            p.grad = scalers[-1].scale(torch.cat(gs)) if fp16 else torch.cat(gs)
        sgd.step(scalers[-1] if fp16 else None)
        scalers[-1].update()
        for m, opt, gs, s, scaler in zip(members, refs, grads, schedules, scalers, strict=False):
            for p, grad in zip(m.parameters(), gs, strict=True):
                p.grad = scaler.scale(grad) if fp16 else grad
            for group in opt.param_groups:
                group["lr"] = s[i]
            scaler.step(opt) if fp16 else opt.step()
            scaler.update()
    for k, (m, opt) in enumerate(zip(members, refs, strict=True)):
        for p, fp, view in zip(m.parameters(), model.parameters(), sgd.views[k], strict=True):
            assert torch.equal(fp.detach().chunk(runs)[k], p.detach())
            assert torch.equal(sgd.optimizers[k].state[view]["momentum_buffer"], opt.state[p]["momentum_buffer"])


def test_checkpointed_lrs_are_floats_and_come_back_into_the_tensors() -> None:
    model = build_model("resnet8")
    sgd = RunsSGD(model, 1, CPU, None, [(0.9, 1e-4)])
    sgd.set_lr([0.01])
    states = sgd.state_dicts()
    assert states[0]["param_groups"][0]["lr"] == 0.01
    assert isinstance(sgd.optimizers[0].param_groups[0]["lr"], torch.Tensor)
    again = RunsSGD(model, 1, CPU, None, [(0.9, 1e-4)])
    again.load_state_dicts(states)
    assert again.optimizers[0].param_groups[0]["lr"] is again.lrs[0] and again.lrs[0].item() == 0.01


def test_the_whole_step_is_refused_where_it_cannot_be_one_cuda_graph() -> None:
    """Checked before anything is allocated, so a CUDA device object is enough here."""
    model = build_model("resnet8")
    for device, amp, why in ((CPU, None, "cpu has none"), (torch.device("cuda"), torch.float16, "GradScaler")):
        with pytest.raises(ValueError, match=why):
            TrainStep(model, device, amp, True, whole_step=True)


def test_the_loss_outside_the_graph_is_the_same_step() -> None:
    """compiled_loss=False (the benchmark's row for what compiling the loss with the model
    gains): the model alone is compiled, and the loss and wrong counts run eagerly after it.
    Through aot_eager, which runs the traced ops as they are, its steps are the eager steps,
    bit for bit: the row measures the same arithmetic, split differently."""
    from torch._dynamo.eval_frame import OptimizedModule

    from fastres.step import Objective, compiler_backend

    torch.manual_seed(0)
    eager_model = build_model("resnet8")
    outside_model = copy.deepcopy(eager_model)
    eager = TrainStep(eager_model, CPU, None, False)
    with compiler_backend("aot_eager"):
        outside = TrainStep(outside_model, CPU, None, True, compiled_loss=False)
    assert type(outside.objective) is Objective and isinstance(outside.objective.model, OptimizedModule)
    for x, y in _batches(3):
        (a, wa), (b, wb) = eager(x, y), outside(x, y)
        assert torch.equal(a, b) and torch.equal(wa, wb)
    for p, q in zip(eager_model.parameters(), outside_model.parameters(), strict=True):
        assert torch.equal(p, q)
