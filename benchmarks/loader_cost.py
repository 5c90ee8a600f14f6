"""Loader cost: what the training loader of exact resume (torchdata's ``StatefulDataLoader`` with the per-epoch seeded
order) costs per batch against a plain ``DataLoader(shuffle=True)``, on the same dataset, measured interleaved.

Each round iterates one epoch of each loader, one after the other, and times every batch (the first batch of each
epoch, which starts the workers' iterator, is kept apart); the first round is warm-up. It also times ``state_dict()``,
which Lightning calls once per checkpoint. The dataset is real Fashion-MNIST through ``FashionMNISTDataModule`` where
it is installed, else random images of its shape.

    python benchmarks/loader_cost.py --workers 0 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torchdata
from _common import RESULTS, machine, markdown_table, quiet_lightning, write_results
from torch.utils.data import DataLoader, TensorDataset

from freeadv_pl import FashionMNISTDataModule
from freeadv_pl.data.fashion_mnist import DEBIAN_DIR

LOADERS = {
    "DataLoader(shuffle=True)": "plain",
    "StatefulDataLoader(shuffle=True)": "stateful",
    "StatefulDataLoader + seeded order (default)": "seeded",
}


def make_loader(kind: str, data: FashionMNISTDataModule, workers: int) -> Any:
    data.num_workers, data.seeded_order = workers, kind == "seeded"
    if kind == "plain":
        return DataLoader(data.train_set, data.batch_size, shuffle=True, num_workers=workers)
    return data.train_dataloader()


def time_epoch(loader: Any) -> tuple[float, list[float]]:
    """The first batch's time and every later batch's, in seconds."""
    times, start = [], time.perf_counter()
    for _ in loader:
        now = time.perf_counter()
        times.append(now - start)
        start = now
    return times[0], times[1:]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-size", type=int, default=None, help="training images (None: all 55,000)")
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds, after one warm-up round")
    parser.add_argument("--out", type=Path, default=RESULTS / "loader_cost_cpu")
    args = parser.parse_args(argv)

    real = (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file()
    data = FashionMNISTDataModule(batch_size=args.batch_size, train_size=args.train_size, val_size=5000)
    if real:
        data.setup("fit")
    else:
        size = args.train_size or 55000
        data.train_set = TensorDataset(torch.rand(size, 1, 28, 28), torch.randint(0, 10, (size,)))
    rows = []
    for workers in args.workers:
        batches: dict[str, list[float]] = {name: [] for name in LOADERS}
        firsts: dict[str, list[float]] = {name: [] for name in LOADERS}
        states: dict[str, list[float]] = {name: [] for name in LOADERS}
        for round_number in range(args.rounds + 1):
            for name, kind in LOADERS.items():
                loader = make_loader(kind, data, workers)
                first, later = time_epoch(loader)
                start = time.perf_counter()
                if kind != "plain":
                    loader.state_dict()
                state_time = time.perf_counter() - start
                if round_number:
                    firsts[name].append(first)
                    batches[name] += later
                    states[name].append(state_time)
        plain = statistics.median(batches["DataLoader(shuffle=True)"])
        for name, kind in LOADERS.items():
            median = statistics.median(batches[name])
            rows.append(
                {
                    "workers": workers,
                    "loader": name,
                    "us_per_batch": median * 1e6,
                    "us_over_plain": (median - plain) * 1e6,
                    "ratio": median / plain,
                    "first_batch_ms": statistics.median(firsts[name]) * 1e3,
                    "state_dict_us": statistics.median(states[name]) * 1e6 if kind != "plain" else "",
                    "batches_timed": len(batches[name]),
                }
            )
    dataset = "Fashion-MNIST (real)" if real else "random 1×28×28 images"
    info = machine("cpu", args) | {"torchdata": torchdata.__version__, "dataset": dataset}
    table = markdown_table(
        rows,
        [
            ("workers", "workers"),
            ("loader", "loader"),
            ("us_per_batch", "µs per batch (median)"),
            ("us_over_plain", "µs over plain"),
            ("ratio", "÷ plain"),
            ("first_batch_ms", "first batch (ms)"),
            ("state_dict_us", "state_dict (µs)"),
            ("batches_timed", "batches timed"),
        ],
    )
    write_results(args.out, f"Training loader cost, batch {args.batch_size}", info, rows, table)
    print(table)
    return rows


if __name__ == "__main__":
    quiet_lightning()
    main()
