"""On a CUDA GPU (skipped elsewhere): an fp16 overflow in one replay skips that optimizer step, lowers the loss
scale and leaves δ finite and unchanged; bf16 autocast trains every module with finite results."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from conftest import banded_dataset, needs_cuda, quiet_trainer
from freeadv_pl import FastAdversarialModule, FreeAdversarialModule, NaturalModule, PGDAdversarialModule



class OverflowingLinear(nn.Module):
    """A linear classifier whose logits are multiplied by 1e6 on the chosen calls: inf in fp16 (max 65504)."""

    def __init__(self, overflow_calls: set[int]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(36, 3)
        self.overflow_calls = overflow_calls
        self.calls = 0
        self.inputs: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.inputs.append(x.detach().clone())
        self.weights.append(self.linear.weight.detach().clone())
        logits = self.linear(x.flatten(1))
        return logits * 1e6 if self.calls in self.overflow_calls else logits


@needs_cuda
def test_an_fp16_overflow_skips_the_step_and_leaves_delta_finite_and_unchanged():
    # Batches of 16, Free-2: calls 3 and 4 are the two replays of the second batch; call 3 overflows.
    backbone = OverflowingLinear(overflow_calls={3})
    # The overflow is in the forward pass (the loss is NaN), which "raise", the default, would stop on.
    module = FreeAdversarialModule(backbone, num_classes=3, replays=2, epsilon=0.1, on_nonfinite_loss="skip")
    trainer = quiet_trainer(accelerator="cuda", precision="16-mixed", max_epochs=1)
    trainer.fit(module, DataLoader(banded_dataset(48), batch_size=16))
    scaler = trainer.precision_plugin.scaler
    assert scaler.get_scale() == 2.0**16 * scaler.get_backoff_factor(), "one skipped step halves the loss scale"
    torch.testing.assert_close(backbone.weights[3], backbone.weights[2], rtol=0, atol=0)  # the step was skipped
    assert not torch.equal(backbone.weights[4], backbone.weights[3]), "the next replay steps again"
    torch.testing.assert_close(backbone.inputs[3], backbone.inputs[2], rtol=0, atol=0)  # δ was not updated
    assert not torch.equal(backbone.inputs[2], backbone.inputs[1]), "δ moves on replays without overflow"
    assert torch.isfinite(module.delta).all() and module.delta.abs().max() <= 0.1 + 1e-6
    assert all(torch.isfinite(p).all() for p in module.parameters())


@needs_cuda
@pytest.mark.parametrize(
    "make_module",
    [
        lambda backbone: NaturalModule(backbone, 3),
        lambda backbone: FreeAdversarialModule(backbone, 3, replays=2, epsilon=0.03),
        lambda backbone: PGDAdversarialModule(backbone, 3, steps=2, epsilon=0.03, step_size=0.015),
        lambda backbone: FastAdversarialModule(backbone, 3, epsilon=0.03),
    ],
    ids=["natural", "free", "pgd", "fgsm-rs"],
)
def test_bf16_autocast_trains_every_module_on_the_gpu(make_module):
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 3))
    module = make_module(backbone)
    loader = DataLoader(banded_dataset(512), batch_size=32, shuffle=True)
    trainer = quiet_trainer(accelerator="cuda", precision="bf16-mixed", max_epochs=3)
    trainer.fit(module, loader, DataLoader(banded_dataset(128, seed=1), batch_size=64))
    assert all(torch.isfinite(p).all() for p in module.parameters())
    # On the CPU, bf16 as fp32: 0.69 to 0.94 after 3 epochs at ε = 0.03 (chance is 1/3).
    assert trainer.callback_metrics["val/acc"] > 0.55, "it learns the banded task"


@needs_cuda
@pytest.mark.parametrize("place", ["device", "cpu"])
def test_the_delta_bank_on_the_gpu_or_in_pinned_host_memory_gives_the_same_training(place):
    x, y = banded_dataset(40)[:]
    loader = DataLoader(torch.utils.data.TensorDataset(x, y, torch.arange(40)), batch_size=16)
    results = {}
    for bank in ("device", place):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(36, 3))
        module = FreeAdversarialModule(net, 3, replays=2, epsilon=0.1, delta_memory="example", delta_bank=bank)
        quiet_trainer(accelerator="gpu", max_epochs=2).fit(module, train_dataloaders=loader)
        expected_device = "cuda" if bank == "device" else "cpu"
        assert module.delta.device.type == expected_device and module.delta.shape == (40, 1, 6, 6)
        assert bank == "device" or module.delta.is_pinned()
        results[bank] = (module.delta.cpu(), [p.detach().cpu() for p in module.parameters()])
    torch.testing.assert_close(results["device"][0], results[place][0])
    for ours, theirs in zip(results["device"][1], results[place][1], strict=True):
        torch.testing.assert_close(ours, theirs)
