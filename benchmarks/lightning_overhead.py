"""Lightning overhead: Free-m as a plain PyTorch loop (written here, like the official code's loop) against
``FreeAdversarialModule`` under a Trainer, on the same model initialisation and the same batches.

Both sides train Free-m on ``--batches`` minibatches after ``--warmup`` of them; the clock runs from the start of
the first timed minibatch to the end of the last one, the device synchronised at both ends. Repetitions alternate
raw loop and Trainer and the median throughput (minibatch images per second) of each is reported. Two Trainer set-
ups: "lean" (no logger, no progress bar, no checkpointing) and "default" (CSV logger every 50 steps, the progress bar,
checkpointing at the end); on a GPU also "lean, cuda_graph" (``FreeAdversarialModule(cuda_graph=True)``). As a check
that they compute the same thing, the final weights of the first repetition of each are compared (max |difference|;
0 up to float rounding on the CPU). Besides throughput, each run's time per optimizer step and what it adds to the
raw loop's are printed, in microseconds: on ``--model tiny`` (an MLP on 4×4 images, batch 32 on the CPU) compute
is close to zero and the difference is the module's and Lightning's own per-step work.

    python benchmarks/lightning_overhead.py --model tiny --device cpu --batch-size 32 --threads 1 --batches 300
    python benchmarks/lightning_overhead.py --model small_cnn --device cpu
    python benchmarks/lightning_overhead.py --model preact_resnet18 --device cuda --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import (
    EPSILON,
    MODELS,
    RESULTS,
    machine,
    make_module,
    markdown_table,
    quiet_lightning,
    synthetic_batches,
    write_results,
)
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def raw_loop(args: argparse.Namespace, loader) -> tuple[float, dict[str, torch.Tensor]]:
    """Free-m in plain PyTorch: the seconds of the timed minibatches and the final weights."""
    torch.manual_seed(0)
    module = make_module("free", args.model, args.replays)  # the same backbone, initialisation and optimizer
    model = module.model.to(args.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = module.optimizer_factory(model.parameters())
    autocast = (
        torch.autocast(args.device, dtype=torch.bfloat16)
        if args.precision == "bf16-mixed"
        else contextlib.nullcontext()
    )
    model.train()
    delta = None
    start = 0.0
    for index, (x, y) in enumerate(loader):
        if index == args.warmup:
            _sync(args.device)
            start = time.perf_counter()
        if delta is None:
            delta = torch.zeros_like(x)
        for _ in range(args.replays):
            leaf = delta[: x.shape[0]].clone().requires_grad_(True)
            with autocast:
                loss = F.cross_entropy(model(torch.clamp(x + leaf, 0, 1)), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                delta[: x.shape[0]] = (leaf + EPSILON * leaf.grad.sign()).clamp_(-EPSILON, EPSILON)
    _sync(args.device)
    return time.perf_counter() - start, {k: v.detach().cpu() for k, v in model.state_dict().items()}


class _Clock(Callback):
    """Seconds from the start of minibatch ``warmup`` to the end of training, the device synchronised at both."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.seconds = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            _sync(pl_module.device.type)
            self.start = time.perf_counter()

    def on_train_end(self, trainer: Trainer, pl_module: Any) -> None:
        _sync(pl_module.device.type)
        self.seconds = time.perf_counter() - self.start


def module_under_trainer(args: argparse.Namespace, loader, setup: str) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    graph = setup.endswith("cuda_graph")
    module = make_module("free", args.model, args.replays, channels_last=args.channels_last, cuda_graph=graph)
    clock = _Clock(args.warmup)
    with tempfile.TemporaryDirectory() as folder:
        settings: dict[str, Any] = {
            "accelerator": args.device,
            "devices": 1,
            "precision": args.precision,
            "max_epochs": 1,
            "num_sanity_val_steps": 0,
            "callbacks": [clock],
            "default_root_dir": folder,
            "enable_model_summary": False,
        }
        if setup.startswith("lean"):
            settings.update(logger=False, enable_checkpointing=False, enable_progress_bar=False)
        else:
            settings.update(logger=CSVLogger(folder), log_every_n_steps=50)
        Trainer(**settings).fit(module, loader)
    return clock.seconds, {k: v.detach().cpu() for k, v in module.model.state_dict().items()}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="small_cnn")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="32-true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--replays", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=5, help="untimed minibatches at the start of each run")
    parser.add_argument("--batches", type=int, default=40, help="timed minibatches per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="results path without suffix")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loader = synthetic_batches(args.model, args.warmup + args.batches, args.batch_size, args.device)
    runs = {"raw PyTorch loop": lambda: raw_loop(args, loader)}
    for setup in ("lean", "default", "lean, cuda_graph") if args.device == "cuda" else ("lean", "default"):
        runs[f"FreeAdversarialModule + Trainer ({setup})"] = lambda setup=setup: module_under_trainer(
            args, loader, setup
        )
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for repeat in range(args.repeats):
        for name, run in runs.items():
            elapsed, state = run()
            seconds[name].append(elapsed)
            weights.setdefault(name, state)
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{n} {s[-1]:.2f} s" for n, s in seconds.items()))
    raw_name = "raw PyTorch loop"
    raw = args.batch_size * args.batches / statistics.median(seconds[raw_name])
    steps = args.batches * args.replays
    raw_step_us = 1e6 * statistics.median(seconds[raw_name]) / steps
    rows = []
    for name in runs:
        throughput = args.batch_size * args.batches / statistics.median(seconds[name])
        step_us = 1e6 * statistics.median(seconds[name]) / steps
        difference = max(
            (weights[name][k].float() - weights[raw_name][k].float()).abs().max().item() for k in weights[raw_name]
        )
        rows.append(
            {
                "run": name,
                "images_per_s": throughput,
                "ratio_to_raw": throughput / raw,
                "us_per_step": step_us,
                "us_over_raw": step_us - raw_step_us,
                "seconds": [round(s, 3) for s in seconds[name]],
                "max_weight_difference_to_raw": difference,
            }
        )
    info = machine(args.device, args)
    columns = [
        ("run", "run"),
        ("images_per_s", "minibatch images / s"),
        ("ratio_to_raw", "÷ raw loop"),
        ("us_per_step", "µs / optimizer step"),
        ("us_over_raw", "µs over raw"),
        ("seconds", "seconds per repeat"),
        ("max_weight_difference_to_raw", "max abs Δweight vs raw"),
    ]
    table = markdown_table(rows, columns)
    print(table)
    out = args.out or RESULTS / f"lightning_overhead_{args.model}_{args.device}_{args.precision}"
    title = f"Lightning overhead, Free-{args.replays}, {args.model}, batch {args.batch_size}, {info['device']}"
    write_results(Path(out), title, info, rows, table)
    return rows


if __name__ == "__main__":
    quiet_lightning()
    main()
