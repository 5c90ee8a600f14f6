"""Step cost: the median time of one optimizer step (and one minibatch) of each training algorithm, as the package's
modules run it under a Lightning Trainer, measured interleaved on one model and one set of batches.

Each round fits every method's module for ``--batches`` minibatches, one method after the other; the first round
is warm-up (and, with ``--compile``, compilation) and is not counted. A minibatch's time is the interval between
two successive ``on_train_batch_start`` calls, the device synchronised at each, so it holds everything the Trainer
does per batch (logging included); the first interval of each fit is dropped. A Free-m minibatch is m optimizer
steps, so its step time is the minibatch time / m; the other methods take one optimizer step per minibatch.

    python benchmarks/step_cost.py --model small_cnn --device cpu
    python benchmarks/step_cost.py --model preact_resnet18 --device cuda --precision bf16-mixed --channels-last
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _common import (
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

METHODS = ("natural", "free", "pgd3", "pgd7", "fgsm_rs")


class BatchTimer(Callback):
    """The intervals between successive training-batch starts, the device synchronised before each reading."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer: Trainer, pl_module: Any) -> None:
        self.on_train_batch_start(trainer, pl_module, None, -1)  # closes the last batch's interval

    def intervals(self) -> list[float]:
        return [b - a for a, b in zip(self.starts[1:-1], self.starts[2:], strict=True)]  # the first is dropped


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    batches = synthetic_batches(args.model, args.batches, args.batch_size, args.device)
    options = {"channels_last": args.channels_last, "compile": args.compile}
    modules = {method: make_module(method, args.model, args.replays, **options) for method in args.methods}
    times: dict[str, list[float]] = {method: [] for method in args.methods}
    for round_index in range(args.rounds + 1):
        for method, module in modules.items():
            timer = BatchTimer()
            trainer = Trainer(
                accelerator=args.device,
                devices=1,
                precision=args.precision,
                max_epochs=1,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
                callbacks=[timer],
            )
            trainer.fit(module, batches)
            if round_index > 0:
                times[method] += timer.intervals()
        label = "warm-up round" if round_index == 0 else f"round {round_index}/{args.rounds}"
        print(f"{label} done: " + ", ".join(f"{m} {statistics.median(t) * 1e3:.1f} ms" for m, t in times.items() if t))
    rows = []
    for method, module in modules.items():
        batch_seconds = statistics.median(times[method])
        steps = args.replays if method == "free" else 1
        rows.append(
            {
                "method": f"Free-{args.replays}"
                if method == "free"
                else {"natural": "natural", "pgd3": "PGD-3", "pgd7": "PGD-7", "fgsm_rs": "FGSM-RS"}[method],
                "passes_per_batch": module.passes_per_batch,
                "optimizer_steps_per_batch": steps,
                "batch_ms": 1e3 * batch_seconds,
                "batch_ms_iqr": 1e3 * _iqr(times[method]),
                "step_ms": 1e3 * batch_seconds / steps,
                "images_per_s": args.batch_size / batch_seconds,
                "samples": len(times[method]),
            }
        )
    natural = rows[0] if rows[0]["method"] == "natural" else None
    for row in rows:
        if natural is not None:
            row["step_ratio"] = row["step_ms"] / natural["step_ms"]
            row["batch_ratio"] = row["batch_ms"] / natural["batch_ms"]
    return rows


def _iqr(values: list[float]) -> float:
    quartiles = statistics.quantiles(values, n=4)
    return quartiles[2] - quartiles[0]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="small_cnn")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", default="32-true", help="Trainer precision, e.g. 32-true or bf16-mixed")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (module option compile)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--replays", type=int, default=8, help="m of Free-m")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--batches", type=int, default=12, help="minibatches per method and round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, after one warm-up round")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None, help="results path without suffix (.json and .md)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = measure(args)
    info = machine(args.device, args)
    columns = [
        ("method", "method"),
        ("passes_per_batch", "passes / batch"),
        ("step_ms", "ms / optimizer step"),
        ("step_ratio", "step ÷ natural"),
        ("batch_ms", "ms / minibatch"),
        ("batch_ms_iqr", "IQR ms"),
        ("batch_ratio", "minibatch ÷ natural"),
        ("images_per_s", "minibatch images / s"),
        ("samples", "timed minibatches"),
    ]
    table = markdown_table(rows, columns)
    print(table)
    if args.out is None:
        suffix = f"{args.model}_{args.device}_{args.precision}" + ("_cl" if args.channels_last else "")
        args.out = RESULTS / f"step_cost_{suffix}{'_compile' if args.compile else ''}"
    title = f"Step cost, {args.model}, batch {args.batch_size}, {info['device']}, {args.precision}"
    write_results(args.out, title, info, rows, table)
    return rows


if __name__ == "__main__":
    quiet_lightning()
    main()
