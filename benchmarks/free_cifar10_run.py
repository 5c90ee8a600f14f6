"""A whole Free-m training run for time: PreActResNet-18 on CIFAR-10-shaped data through the real pipeline
(``CIFAR10DataModule`` reading files in torchvision's format, random crop + flip in DataLoader workers, pinned
memory), ``--epochs`` epochs of m replays each (80 replay-passes over the data = 10 epochs of Free-8), timed by the
package's ``TrainingTime`` callback. The images are random (written here in CIFAR-10's on-disk format): the run
measures time, not accuracy. No validation (timing only).

    python benchmarks/free_cifar10_run.py --device cuda --precision bf16-mixed --channels-last --workers 8
    python benchmarks/free_cifar10_run.py --device cuda --precision bf16-mixed --channels-last --cuda-graph --workers 12
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS, machine, markdown_table, quiet_lightning, write_results
from lightning.pytorch import Trainer

from freeadv_pl import CIFAR10DataModule, FreeAdversarialModule, PreActResNet18, TrainingTime

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dataset_files import write_cifar  # the test suite's writer of torchvision's CIFAR format


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--cuda-graph", action="store_true", help="FreeAdversarialModule(cuda_graph=True)")
    parser.add_argument("--replays", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train-size", type=int, default=50000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--out", default=None, help="results path without suffix")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        write_cifar(Path(folder), n_train=args.train_size, n_test=100)
        print(f"wrote {args.train_size} random CIFAR-10-format images in {time.perf_counter() - started:.1f} s")
        data = CIFAR10DataModule(
            data_dir=folder,
            batch_size=args.batch_size,
            val_size=0,
            num_workers=args.workers,
            pin_memory=args.device == "cuda",
        )
        module = FreeAdversarialModule(
            PreActResNet18(num_classes=10),
            num_classes=10,
            replays=args.replays,
            epsilon="8/255",
            mean=data.mean,
            std=data.std,
            channels_last=args.channels_last,
            compile=args.compile,
            cuda_graph=args.cuda_graph,
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.MultiStepLR(optimizer, [40000, 60000], 0.1),
        )
        timer = TrainingTime()
        trainer = Trainer(
            accelerator=args.device,
            devices=1,
            precision=args.precision,
            max_epochs=args.epochs,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[timer],
        )
        trainer.fit(module, datamodule=data)
    summary = dict(timer.summary)
    summary["replay_passes_over_data"] = args.epochs * args.replays
    summary["images_per_s"] = summary["passes"] * args.batch_size / (60 * summary["train_minutes"])
    info = machine(args.device, args)
    columns = [
        ("train_minutes", "training minutes"),
        ("fit_minutes", "minutes in fit"),
        ("optimizer_steps", "optimizer steps"),
        ("passes", "forward/backward passes"),
        ("replay_passes_over_data", "replay-passes over the data"),
        ("images_per_s", "images / s (passes)"),
    ]
    table = markdown_table([summary], columns)
    print(table)
    suffix = "_cuda_graph" if args.cuda_graph else ""
    out = args.out or RESULTS / f"free_cifar10_run_{args.device}_{args.precision}{suffix}"
    title = f"Free-{args.replays} PreActResNet-18, {args.epochs} epochs of CIFAR-10-shaped data, {info['device']}"
    write_results(Path(out), title, info, [summary], table)
    return summary


if __name__ == "__main__":
    quiet_lightning()
    main()
