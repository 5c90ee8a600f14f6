"""FreeAdversarialModule(cuda_graph=True): on a CUDA GPU (skipped elsewhere) the captured replay trains to the
eager path's weights, δ, LR and global_step, resumes from its checkpoints, and refuses what a graph cannot hold;
on the CPU (and wherever capture cannot work) it falls back to the eager path with a one-line warning."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import needs_cuda, quiet_trainer, tiny_cnn, tiny_loader
from freeadv_pl import FreeAdversarialModule


def bn_cnn() -> nn.Module:
    """A small CNN with batch norm (its running statistics are part of what the graph must update)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def cifar_like_loader() -> DataLoader:
    """200 random 3×16×16 images in batches of 32: the last batch (8 images) runs eagerly."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(200, 3, 16, 16, generator=generator), torch.randint(0, 10, (200,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)


def graph_module(cuda_graph: bool, **options) -> FreeAdversarialModule:
    settings = dict(
        replays=4,
        epsilon="8/255",
        step_size="4/255",
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4, fused=True),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[30], gamma=0.1),
        cuda_graph=cuda_graph,
    )
    settings.update(options)
    return FreeAdversarialModule(bn_cnn(), num_classes=10, **settings)


def fit(module: FreeAdversarialModule, ckpt_path: str | None = None, **trainer_options) -> FreeAdversarialModule:
    """Two epochs of :func:`cifar_like_loader` on the GPU (``trainer_options`` override); the module comes back with
    the Trainer's ``global_step`` as ``global_step_seen``."""
    trainer = quiet_trainer(**{"accelerator": "gpu", "max_epochs": 2, **trainer_options})
    trainer.fit(module, cifar_like_loader(), ckpt_path=ckpt_path)
    module.global_step_seen = trainer.global_step
    return module


def difference(a: FreeAdversarialModule, b: FreeAdversarialModule) -> float:
    """The largest absolute difference between the two models' parameters and buffers."""
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


@pytest.fixture
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize(("precision", "share"), [("32-true", 0.02), ("bf16-mixed", 0.2)])
def test_the_graph_trains_to_the_eager_weights_delta_lr_and_step(precision, share, no_tf32):
    initial = graph_module(False)
    eager = fit(graph_module(False), precision=precision)
    graphed = fit(graph_module(True), precision=precision)
    assert graphed._graph is not None and graphed._graph.graph is not None  # it really ran as a graph
    assert graphed.global_step_seen == eager.global_step_seen == 2 * 7 * 4
    lr = graphed.trainer.optimizers[0].param_groups[0]["lr"]
    assert float(lr) == pytest.approx(eager.trainer.optimizers[0].param_groups[0]["lr"])  # 0.005 after step 30
    gap, moved = difference(graphed, eager), difference(eager, initial)
    delta_mismatch = (graphed.delta != eager.delta).float().mean().item()
    print(
        f"{precision}: max |graph - eager| = {gap:.3g}, max |eager - initial| = {moved:.3g}, δ differs in "
        f"{100 * delta_mismatch:.2f} % of its elements"
    )
    assert gap < share * moved
    assert delta_mismatch < share / 2
    assert graphed.delta.abs().max() <= 8 / 255 + 1e-6


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize(
    ("options", "bound"),
    [
        pytest.param({"norm": "l2", "epsilon": 0.5, "step_size": 0.25}, 0.5, id="l2"),
        pytest.param({"loss": "trades"}, None, id="trades"),
        pytest.param({"norm": "l2", "epsilon": 0.5, "loss": "trades"}, 0.5, id="l2-trades"),
    ],
)
def test_the_graph_captures_the_l2_step_and_the_trades_loss_as_eager_runs_them(options, bound, no_tf32):
    initial = graph_module(False, **options)
    eager = fit(graph_module(False, **options))
    graphed = fit(graph_module(True, **options))
    assert graphed._graph is not None and graphed._graph.graph is not None
    assert graphed.global_step_seen == eager.global_step_seen
    gap, moved = difference(graphed, eager), difference(eager, initial)
    delta_gap = (graphed.delta - eager.delta).abs().max().item()
    print(f"{options}: max |graph - eager| = {gap:.3g} (moved {moved:.3g}); max |δ graph - δ eager| = {delta_gap:.3g}")
    assert gap < 0.02 * moved
    assert delta_gap < 0.02 * eager.delta.abs().max().item() or (graphed.delta != eager.delta).float().mean() < 0.01
    if bound is not None:
        assert graphed.delta.flatten(1).norm(dim=1).max() <= bound + 1e-5


@needs_cuda
@pytest.mark.gpu
def test_a_graph_run_resumes_from_its_checkpoint(tmp_path, no_tf32):
    whole = fit(graph_module(True))
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(graph_module(True), max_epochs=1, enable_checkpointing=True, callbacks=[checkpoint])
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert isinstance(saved["optimizer_states"][0]["param_groups"][0]["lr"], float)
    resumed = fit(graph_module(True), ckpt_path=str(tmp_path / "last.ckpt"))
    gap, moved = difference(resumed, whole), difference(whole, graph_module(False))
    print(f"resume: max |resumed - whole| = {gap:.3g} (weights moved {moved:.3g})")
    assert resumed.global_step_seen == whole.global_step_seen and gap < 0.02 * moved


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize(
    ("options", "trainer_options", "reason"),
    [
        pytest.param(
            {"optimizer": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)},
            {},
            "SGD as configured cannot step inside a CUDA graph",
            id="foreach-sgd",
        ),
        pytest.param({}, {"precision": "16-mixed"}, "precision='16-mixed'", id="fp16-scaler"),
    ],
)
def test_what_a_graph_cannot_hold_runs_eagerly_with_one_warning(options, trainer_options, reason):
    module = graph_module(True, **options)
    with pytest.warns(UserWarning, match=f"cuda_graph=True: .*{reason}.*run eagerly"):
        fit(module, **trainer_options)
    assert module._graph is None and torch.isfinite(module.delta).all()


@needs_cuda
@pytest.mark.gpu
def test_a_scheduler_that_moves_momentum_is_refused_with_the_fix():
    module = graph_module(
        True, lr_scheduler=lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=100)
    )
    with pytest.raises(ValueError, match="cycle_momentum=False"):
        fit(module)


def test_on_the_cpu_cuda_graph_falls_back_to_the_eager_weights():
    runs = []
    for cuda_graph in (False, True):
        module = FreeAdversarialModule(tiny_cnn(), num_classes=3, replays=2, epsilon=0.1, cuda_graph=cuda_graph)
        if cuda_graph:
            with pytest.warns(UserWarning, match="cuda_graph=True: training runs on cpu, not on a CUDA device"):
                quiet_trainer(max_epochs=2).fit(module, tiny_loader())
        else:
            quiet_trainer(max_epochs=2).fit(module, tiny_loader())
        runs.append(module)
    eager, fallback = runs
    assert all(torch.equal(a, b) for a, b in zip(eager.state_dict().values(), fallback.state_dict().values()))
    assert torch.equal(eager.delta, fallback.delta)
