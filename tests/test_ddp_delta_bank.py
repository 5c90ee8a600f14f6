"""``delta_memory="example"`` under 2-process CPU DDP (gloo): each image's δ is updated once per epoch, by the
process whose sampler gave it that image, and after every epoch both processes hold the same bank, which the
checkpoint holds too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from freeadv_pl.modules._delta_bank import BANK_KEY

TESTS = Path(__file__).resolve().parent
IMAGES, STEP, EPOCHS = 16, 0.03, 2

DDP_SCRIPT = """
import sys
from pathlib import Path
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset
sys.path.insert(0, {tests!r})
from conftest import quiet_trainer, tiny_cnn
from freeadv_pl import FreeAdversarialModule

generator = torch.Generator().manual_seed(0)
images = torch.rand({images}, 1, 6, 6, generator=generator)
dataset = TensorDataset(images, torch.randint(0, 3, ({images},), generator=generator), torch.arange({images}))
loader = DataLoader(dataset, batch_size=4, shuffle=True)  # Lightning gives it a DistributedSampler


class Record(Callback):
    def __init__(self):
        self.seen, self.banks = [[] for _ in range({epochs})], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen[trainer.current_epoch] += batch[2].tolist()

    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch > 0:  # the bank after the previous epoch's synchronisation
            self.banks.append(module.delta.clone())

    def on_train_end(self, trainer, module):
        self.banks.append(module.delta.clone())
        state = dict(seen=self.seen, banks=self.banks, weights=module.state_dict())
        torch.save(state, Path({out!r}) / f"rank{{trainer.global_rank}}.pt")


module = FreeAdversarialModule(tiny_cnn(), 3, replays=1, epsilon=0.1, step_size={step}, delta_memory="example")
trainer = quiet_trainer(
    devices=2, strategy="ddp", max_epochs={epochs}, enable_checkpointing=True,
    callbacks=[Record(), ModelCheckpoint(dirpath={out!r}, save_last=True)],
)
trainer.fit(module, loader)
"""


def test_each_image_is_updated_once_per_epoch_and_the_bank_is_the_same_on_both_processes(tmp_path):
    script = tmp_path / "train_ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(TESTS), out=str(tmp_path), images=IMAGES, step=STEP, epochs=EPOCHS))
    result = subprocess.run(
        [sys.executable, str(script)], check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]

    for epoch in range(EPOCHS):
        seen = [set(state["seen"][epoch]) for state in ranks]
        assert len(ranks[0]["seen"][epoch]) == len(ranks[1]["seen"][epoch]) == IMAGES // 2
        assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(IMAGES)), "each image on one process"
        bank0, bank1 = ranks[0]["banks"][epoch], ranks[1]["banks"][epoch]
        assert torch.equal(bank0, bank1), f"after epoch {epoch} both processes hold the same bank"
        # One replay per visit, sign steps of STEP from δ = 0: after epoch e every |δ| is a multiple k·STEP with
        # k ≤ e + 1, and some reach (e + 1)·STEP: each image was updated exactly once per epoch.
        steps = bank0.abs() / STEP
        assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.max().round() == epoch + 1
        per_image = steps.flatten(1).amax(dim=1).round()
        assert (per_image >= 1).all(), "every image's δ moved in its first epoch"
        changed = (ranks[0]["banks"][epoch] != (ranks[0]["banks"][epoch - 1] if epoch else 0)).flatten(1).any(1)
        assert changed.all(), f"every image's δ changed in epoch {epoch}"
        print(f"epoch {epoch}: images per process {[len(s) for s in seen]}, max |δ| / step = {int(steps.max())}")
    assert all(torch.equal(ranks[0]["weights"][key], ranks[1]["weights"][key]) for key in ranks[0]["weights"])
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)[BANK_KEY]
    assert torch.equal(saved, ranks[0]["banks"][-1])
