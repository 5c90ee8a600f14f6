"""Free-m under 2-process CPU DDP: each process keeps its own δ (never rank 0's) while the weights stay identical;
a checkpoint holds both δ, and resuming under DDP gives each process its own back. The gathering of δ of different
sizes, dtypes or none yet, with threads standing in for processes."""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import quiet_trainer, tiny_cnn, tiny_dataset

from freeadv_pl import FreeAdversarialModule
from freeadv_pl.modules._perturbation import CHECKPOINT_KEY, StoredPerturbation

TESTS = Path(__file__).resolve().parent
STEPS_PER_EPOCH = 2 * 2  # two batches per process, two replays

DDP_SCRIPT = """
import os
import sys
from pathlib import Path
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader
sys.path.insert(0, {tests!r})
from conftest import quiet_trainer, tiny_cnn, tiny_dataset
from freeadv_pl import FreeAdversarialModule

epochs, ckpt_path = int(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else None)
rank = int(os.environ.get("LOCAL_RANK", 0))  # Lightning sets it in the process it starts for rank 1
# Each process its own images and batch size (no distributed sampler): δ has 4 rows on rank 0 and 3 on rank 1.
batch_size = 4 - rank
loader = DataLoader(tiny_dataset(2 * batch_size, seed=10 + rank), batch_size=batch_size)


class Record(Callback):
    def on_train_start(self, trainer, module):
        self.start = None if module.delta is None else module.delta.clone()

    def on_train_end(self, trainer, module):
        state = dict(start=self.start, delta=module.delta, weights=module.state_dict(), step=trainer.global_step)
        torch.save(state, Path({out!r}) / f"epochs{{epochs}}_rank{{trainer.global_rank}}.pt")


module = FreeAdversarialModule(tiny_cnn(seed=rank), 3, replays=2, epsilon=0.1, step_size=0.03)
trainer = quiet_trainer(
    devices=2, strategy="ddp", max_epochs=epochs, use_distributed_sampler=False, enable_checkpointing=True,
    callbacks=[Record(), ModelCheckpoint(dirpath={out!r}, save_last=True)],
)
trainer.fit(module, loader, ckpt_path=ckpt_path)
"""


def _run_ddp(tmp_path: Path, *args: str) -> None:
    script = tmp_path / "train_ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(TESTS), out=str(tmp_path)))
    result = subprocess.run(
        [sys.executable, str(script), *args], check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]


def _weight_gap(first: dict, second: dict) -> float:
    return max((first[key] - second[key]).abs().max().item() for key in first)


def test_each_process_keeps_saves_and_resumes_its_own_delta(tmp_path):
    _run_ddp(tmp_path, "1")
    first = [torch.load(tmp_path / f"epochs1_rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    deltas = [state["delta"] for state in first]
    assert [tuple(delta.shape) for delta in deltas] == [(4, 1, 6, 6), (3, 1, 6, 6)]
    delta_gap, weight_gap = (deltas[0][:3] - deltas[1]).abs().max().item(), _weight_gap(*(s["weights"] for s in first))
    print(f"after one epoch: max |δ_0[:3] - δ_1| = {delta_gap:.3f}, max weight gap between ranks = {weight_gap}")
    assert delta_gap > 0.05, "each process updates δ from its own images"
    assert weight_gap == 0, "DDP keeps the weights identical"

    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)[CHECKPOINT_KEY]
    assert saved["world_size"] == 2
    for saved_delta, delta in zip(saved["per_rank"], deltas, strict=True):
        assert torch.equal(saved_delta, delta)

    _run_ddp(tmp_path, "2", str(tmp_path / "last.ckpt"))
    resumed = [torch.load(tmp_path / f"epochs2_rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    for state, delta in zip(resumed, deltas, strict=True):
        assert torch.equal(state["start"], delta), "each process resumes from its own δ, not rank 0's"
        assert state["step"] == 2 * STEPS_PER_EPOCH
    assert _weight_gap(resumed[0]["weights"], resumed[1]["weights"]) == 0
    assert (resumed[0]["delta"][:3] - resumed[1]["delta"]).abs().max() > 0.05

    # Outside DDP (last.ckpt is now the resumed run's): load_from_checkpoint takes rank 0's δ; so does a one-process
    # resume, with a warning.
    restored = FreeAdversarialModule.load_from_checkpoint(tmp_path / "last.ckpt", backbone=tiny_cnn())
    assert torch.equal(restored.delta, resumed[0]["delta"])
    module = FreeAdversarialModule(tiny_cnn(), 3, replays=2, epsilon=0.1, step_size=0.03)
    loader = torch.utils.data.DataLoader(tiny_dataset(8, seed=10), batch_size=4)
    with pytest.warns(UserWarning, match=r"δ_r of 2 process\(es\) but this run has 1: .*δ_r for r ≥ 1 is not used"):
        quiet_trainer(max_epochs=3).fit(module, loader, ckpt_path=tmp_path / "last.ckpt")


class _Threads:
    """Trainers whose ``all_gather`` runs between threads, standing in for processes: tensors of different shapes
    fail to stack, as ``torch.distributed.all_gather`` refuses them."""

    def __init__(self, world_size: int) -> None:
        self.barrier = threading.Barrier(world_size, timeout=30)
        self.slots: list[torch.Tensor | None] = [None] * world_size

    def trainer(self, rank: int) -> SimpleNamespace:
        def all_gather(tensor: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = tensor
            self.barrier.wait()
            gathered = torch.stack(self.slots)
            self.barrier.wait()  # every thread has read the slots before any writes the next round
            return gathered

        strategy = SimpleNamespace(all_gather=all_gather, root_device=torch.device("cpu"))
        return SimpleNamespace(world_size=len(self.slots), global_rank=rank, strategy=strategy)


@pytest.mark.parametrize(
    "deltas",
    [
        pytest.param([torch.full((4, 1, 6, 6), 0.1), torch.full((3, 1, 6, 6), -0.1, dtype=torch.float16)], id="sizes"),
        pytest.param([torch.full((4, 1, 6, 6), 0.1), None], id="one-without"),
        pytest.param([None, None], id="none-yet"),
    ],
)
def test_saving_gathers_deltas_of_any_size_and_dtype_from_every_process(deltas):
    threads = _Threads(len(deltas))

    def save(rank: int) -> dict:
        stored, checkpoint = StoredPerturbation(), {}
        stored.tensor = deltas[rank]
        stored.save(checkpoint, threads.trainer(rank))
        return checkpoint

    with ThreadPoolExecutor(len(deltas)) as pool:
        checkpoints = list(pool.map(save, range(len(deltas))))
    for checkpoint in checkpoints:  # every process builds the same checkpoint; rank 0 writes it
        if all(delta is None for delta in deltas):
            assert CHECKPOINT_KEY not in checkpoint
            continue
        saved = checkpoint[CHECKPOINT_KEY]
        assert saved["world_size"] == len(deltas)
        for saved_delta, delta in zip(saved["per_rank"], deltas, strict=True):
            if delta is None:
                assert saved_delta is None
            else:
                assert saved_delta.dtype == delta.dtype and torch.equal(saved_delta, delta)
