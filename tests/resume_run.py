"""One training run of tests/test_exact_resume.py, in its own process: a tiny VisionDataModule (shuffled, seeded
order, stateful loader), Free-2 or FGSM-RS with the LR halved at each epoch's end, checkpoints after every batch and every epoch, optionally a SIGTERM to
itself in the middle of a batch's replays, optionally resumed from a checkpoint. It writes each process's final
state (weights, optimizer state, LR, δ, global step) to ``<out>/final_rank<r>.pt``.

    python resume_run.py --method free --out DIR [--resume CKPT] [--sigterm-at STEP] [--devices 2]
"""

from __future__ import annotations

import argparse
import os
import signal
from functools import partial
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.optim.lr_scheduler import StepLR
from torch.utils.data import TensorDataset

from freeadv_pl import FastAdversarialModule, FreeAdversarialModule, PreemptionCheckpoint, VisionDataModule

EPOCHS, IMAGES, BATCH = 3, 40, 8  # 5 batches per epoch (per process under 2-process DDP: 3, the last of 4)


class TinyData(VisionDataModule):
    """40 random 1×6×6 training images of 3 classes, through the package's DataModule machinery."""

    num_classes, mean, std, image_shape = 3, (0.5,), (0.25,), (1, 6, 6)

    def load_split(self, train: bool) -> TensorDataset:
        generator = torch.Generator().manual_seed(0 if train else 1)
        x = torch.rand(IMAGES, 1, 6, 6, generator=generator)
        return TensorDataset(x, torch.randint(0, 3, (IMAGES,), generator=generator))


def signal_at(module_class: type, step: int | None) -> type:
    """``module_class`` that sends itself SIGTERM just before optimizer step ``step`` (inside a batch's replays)."""

    class Signalled(module_class):
        def fit_step(self, inputs, y, *args, **kwargs):
            if self.trainer.global_step == step:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().fit_step(inputs, y, *args, **kwargs)

    return Signalled


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--method", choices=["free", "free-example", "free-l2-trades", "fgsm", "fgsm-l2"], required=True
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--sigterm-at", type=int, default=None)
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    seed_everything(0)
    backbone = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    halve_each_epoch = {"lr_scheduler": partial(StepLR, step_size=1, gamma=0.5), "lr_scheduler_interval": "epoch"}
    if args.method == "fgsm":
        module = signal_at(FastAdversarialModule, args.sigterm_at)(backbone, epsilon=0.1, **halve_each_epoch)
    elif args.method == "fgsm-l2":
        module = signal_at(FastAdversarialModule, args.sigterm_at)(backbone, epsilon=0.5, norm="l2", **halve_each_epoch)
    elif args.method == "free-l2-trades":
        module = signal_at(FreeAdversarialModule, args.sigterm_at)(
            backbone, replays=2, epsilon=0.5, norm="l2", loss="trades", delta_start_noise=0.5, **halve_each_epoch
        )
    else:
        memory = "example" if args.method == "free-example" else "batch"
        module = signal_at(FreeAdversarialModule, args.sigterm_at)(
            backbone, replays=2, epsilon=0.1, delta_memory=memory, delta_start_noise=0.5, **halve_each_epoch
        )
    data = TinyData(batch_size=BATCH, val_size=0, return_index=args.method == "free-example")
    steps = ModelCheckpoint(args.out / "steps", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    epochs = ModelCheckpoint(args.out / "epochs", filename="{epoch}", save_top_k=-1, save_on_train_epoch_end=True)
    trainer = Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=EPOCHS,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[steps, epochs, PreemptionCheckpoint(args.out / "preempted")],
    )
    trainer.fit(module, datamodule=data, ckpt_path=args.resume)
    optimizer = trainer.optimizers[0]
    state = {
        "weights": module.state_dict(),
        "optimizer": optimizer.state_dict()["state"],
        "lr": optimizer.param_groups[0]["lr"],
        "delta": module.delta,
        "global_step": trainer.global_step,
    }
    torch.save(state, args.out / f"final_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
