"""Mixed precision: bf16 autocast end to end on the CPU for every module; fp16 with its GradScaler (an overflowing
replay, gradient clipping on unscaled gradients, non-finite losses) on a CUDA GPU (skipped without one) and on the
CPU, where Lightning refuses ``precision="16-mixed"`` but runs an explicit ``MixedPrecision`` plugin the same way."""

from __future__ import annotations

import pytest
import torch
from conftest import banded_dataset, needs_cuda, quiet_trainer, tiny_dataset
from lightning.pytorch import Callback
from lightning.pytorch.plugins import MixedPrecision
from test_optimizer_step import RecordingSGD
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from freeadv_pl import (
    AttackSpec,
    FastAdversarialModule,
    FreeAdversarialModule,
    NaturalModule,
    PGDAdversarialModule,
    RobustEvaluation,
)

DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])]

MODULES = {
    "natural": lambda backbone, **kwargs: NaturalModule(backbone, 3, **kwargs),
    "free": lambda backbone, **kwargs: FreeAdversarialModule(backbone, 3, replays=2, epsilon=0.1, **kwargs),
    "pgd": lambda backbone, **kwargs: PGDAdversarialModule(backbone, 3, steps=2, epsilon=0.1, step_size=0.05, **kwargs),
    "fgsm-rs": lambda backbone, **kwargs: FastAdversarialModule(backbone, 3, epsilon=0.1, **kwargs),
}


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 3))


@pytest.mark.parametrize("make", MODULES.values(), ids=MODULES.keys())
def test_bf16_mixed_fits_validates_and_evaluates_every_module_on_the_cpu(make):
    backbone = small_cnn()
    dtypes = set()
    backbone[0].register_forward_hook(lambda layer, inputs, output: dtypes.add(output.dtype))
    module = make(backbone)
    attacks = [AttackSpec(steps=0), AttackSpec(steps=3, step_size=0.05)]
    evaluation = RobustEvaluation(attacks, epsilon=0.1, num_samples=16)
    trainer = quiet_trainer(precision="bf16-mixed", limit_train_batches=3, callbacks=[evaluation])
    train = DataLoader(banded_dataset(48), batch_size=8, shuffle=True)
    val = DataLoader(banded_dataset(16, seed=1), batch_size=8)
    trainer.fit(module, train, val)
    assert torch.bfloat16 in dtypes, "the convolution ran under bf16 autocast"
    assert trainer.global_step == 3 * getattr(module, "replays", 1)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in module.parameters())
    for key in ("train/loss", "val/acc", "val/robust/natural", "val/robust/pgd3"):
        assert torch.isfinite(trainer.callback_metrics[key]), key
    if getattr(module, "delta", None) is not None:
        assert module.delta.dtype == torch.float32 and module.delta.abs().max() <= 0.1 + 1e-6
    (results,) = trainer.validate(module, val, verbose=False)
    assert {"val/acc", "val/robust/natural", "val/robust/pgd3"} <= set(results)


class Recorder(nn.Module):
    """Wraps a backbone and keeps, per forward call, its input (x + δ for Free-m) and its first weight."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.inputs: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        self.weights.append(next(self.backbone.parameters()).detach().clone())
        return self.backbone(x)


def fp16(device: str, init_scale: float = 2.0**16, backoff_factor: float = 0.5) -> MixedPrecision:
    """What ``precision="16-mixed"`` sets up, with the GradScaler's settings chosen."""
    scaler = torch.amp.GradScaler(device, init_scale=init_scale, backoff_factor=backoff_factor)
    return MixedPrecision("16-mixed", device, scaler=scaler)


@pytest.mark.parametrize("device", DEVICES)
def test_an_fp16_overflow_skips_the_step_lowers_the_scale_and_leaves_delta_unchanged(device):
    # A loss scale of 2^100 overflows fp16 in the backward pass of the first replay (the loss itself stays finite):
    # the GradScaler skips that step and multiplies its scale by 2^-90, after which replays step normally.
    recorder = Recorder(small_cnn())
    module = FreeAdversarialModule(recorder, 3, replays=2, epsilon=0.1)
    trainer = quiet_trainer(accelerator=device, plugins=[fp16(device, 2.0**100, backoff_factor=2.0**-90)])
    trainer.fit(module, DataLoader(banded_dataset(16), batch_size=8))
    assert trainer.precision_plugin.scaler.get_scale() == 2.0**10, "one skipped step lowered the scale once"
    assert torch.equal(recorder.weights[1], recorder.weights[0]), "the overflowing step was skipped"
    assert torch.equal(recorder.inputs[1], recorder.inputs[0]), "δ was not updated from the inf/NaN δ-gradient"
    assert not torch.equal(recorder.weights[2], recorder.weights[1]), "the next replay stepped"
    assert torch.isfinite(module.delta).all() and 0 < module.delta.abs().max() <= 0.1 + 1e-6
    assert all(torch.isfinite(p).all() for p in module.parameters())


class GradientNorms(Callback):
    """The L2 norm of the whole weight gradient when callbacks see it, before the module clips it."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_clipping_bounds_the_unscaled_gradient(device):
    module = NaturalModule(small_cnn(), 3, gradient_clip_norm=1e-3, optimizer=lambda p: RecordingSGD(p))
    seen = GradientNorms()
    trainer = quiet_trainer(accelerator=device, plugins=[fp16(device)], limit_train_batches=4, callbacks=[seen])
    trainer.fit(module, DataLoader(banded_dataset(32), batch_size=8))
    assert trainer.precision_plugin.scaler.get_scale() == 2.0**16, "no overflow: every step was taken"
    # Unscaled before the module's hook: about the true gradient's norm, far above the bound and far below 2^16 × it.
    assert all(1e-3 < norm < 1e3 for norm in seen.norms)
    # Clipped on the unscaled gradient: the step sees the bound itself, not the bound / 2^16.
    assert trainer.optimizers[0].norms == pytest.approx([1e-3] * 4, rel=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_fp16_nonfinite_loss_is_raised_or_left_to_the_scaler(mode, device):
    x, y = tiny_dataset(12).tensors
    x = x.clone()
    x[4, 0, 2, 2] = float("nan")  # the second batch
    recorder = Recorder(small_cnn())
    module = FreeAdversarialModule(recorder, 3, replays=2, epsilon=0.1, on_nonfinite_loss=mode)  # SGD, momentum 0.9
    trainer = quiet_trainer(accelerator=device, plugins=[fp16(device)])
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    if mode == "raise":
        with pytest.raises(FloatingPointError, match="epoch 0, batch_idx 1, trainer.global_step 2"):
            trainer.fit(module, loader)
        return
    with pytest.warns(UserWarning, match="2 optimizer step"):
        trainer.fit(module, loader)
    # The GradScaler skips the two NaN steps outright (momentum included) and halves its scale for each.
    assert trainer.precision_plugin.scaler.get_scale() == 2.0**14
    assert torch.equal(recorder.weights[4], recorder.weights[2]), "weights before and after the NaN batch"
    # No δ update from the NaN loss (the inputs hold the NaN pixel, hence equal_nan).
    torch.testing.assert_close(recorder.inputs[3], recorder.inputs[2], rtol=0, atol=0, equal_nan=True)
    assert trainer.callback_metrics["train/skipped_steps"] == 2
    assert all(torch.isfinite(p).all() for p in module.parameters()) and torch.isfinite(module.delta).all()
