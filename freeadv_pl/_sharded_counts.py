"""The counting of ``freeadv_pl evaluate`` across processes: the evaluated subset in batches, each process's share of
them seeded as in one process, the exact sum of the counts, and the test split read once per machine."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from freeadv_pl._suite import bind, count


def subset_batches(
    size: int, num_samples: int | None, batch_size: int, seed: int, first: bool = False
) -> list[list[int]]:
    """The evaluated examples of a split of ``size``, in batches: ``num_samples`` of them (all when None), a random
    subset drawn with ``seed`` (sorted; :class:`~freeadv_pl.RobustEvaluation`'s) or, with ``first``, the first ones.

    Example:
        >>> subset_batches(10, 5, 2, seed=0, first=True)
        [[0, 1], [2, 3], [4]]
    """
    wanted = size if num_samples is None else min(num_samples, size)
    if first:
        chosen = list(range(wanted))
    else:
        chosen = sorted(torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:wanted].tolist())
    return [chosen[start : start + batch_size] for start in range(0, len(chosen), batch_size)]


def count_shard(
    model: nn.Module,
    dataset: Dataset,
    batches: Sequence[Sequence[int]],
    suite: Sequence[Any],  # EvaluationAttack objects
    epsilon: float,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    loader: DataLoader | None = None,
    check: Callable[[nn.Module, Tensor, Tensor], None] | None = None,
    progress: bool = False,
) -> dict[str, int]:
    """This process's exact counts (correct examples per attack key, ``worst`` and ``examples``): every
    ``world_size``-th of ``batches`` from ``rank`` on, batch ``b`` seeded with ``seed + b`` as in one process, so that
    the sums over the processes are the one-process counts. ``loader`` lends its workers, pinning and collation."""
    numbers = list(range(len(batches)))[rank::world_size]
    settings = (
        {}
        if loader is None
        else {"num_workers": loader.num_workers, "pin_memory": loader.pin_memory, "collate_fn": loader.collate_fn}
    )
    shard = DataLoader(dataset, batch_sampler=[list(batches[number]) for number in numbers], **settings)
    attacks = bind(suite, model, epsilon)
    if not progress:
        return count(model, shard, attacks, seed=seed, numbers=numbers, inspect=check)
    from tqdm.auto import tqdm

    with tqdm(total=len(numbers), desc="evaluate", unit="batch", file=sys.stderr, dynamic_ncols=True) as bar:
        return count(model, shard, _announced(attacks, bar), seed=seed, numbers=numbers, inspect=check)


def _announced(attacks: dict[str, Callable[..., Tensor]], bar: Any) -> dict[str, Callable[..., Tensor]]:
    """The attacks, naming themselves on the progress bar as they run; the last one of a batch advances it."""
    last = list(attacks)[-1]

    def announced(key: str, attack: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def run(*args: Any, **kwargs: Any) -> Tensor:
            bar.set_postfix_str(key)
            x_adv = attack(*args, **kwargs)
            if key == last:
                bar.update(1)
            return x_adv

        return run

    return {key: announced(key, attack) for key, attack in attacks.items()}


def summed_counts(counts: dict[str, int], device: torch.device | str = "cpu") -> dict[str, int]:
    """``counts`` summed over the processes of the default ``torch.distributed`` group (exactly, as integers); the
    counts themselves when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return dict(counts)
    on = torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")
    values = torch.tensor(list(counts.values()), dtype=torch.long, device=on)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return dict(zip(counts, values.tolist(), strict=True))


def join_processes() -> tuple[int, int, bool]:
    """``(rank, world_size, created)``: under torchrun (``WORLD_SIZE`` > 1) the default process group, made here
    unless it exists."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, False
    created = not dist.is_initialized()
    if created:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), created


def evaluation_device(requested: str | None) -> torch.device:
    """The device asked for (default: cuda if available, else cpu); under torchrun a bare ``cuda`` is
    ``LOCAL_RANK``'s."""
    local = os.environ.get("LOCAL_RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(local or torch.cuda.current_device()))
    return device


def evaluated_split(datamodule: LightningDataModule, rank: int) -> tuple[Dataset, DataLoader]:
    """The test split's dataset and loader: ``prepare_data`` on the first process only, then ``setup("test")``."""
    if rank == 0:
        datamodule.prepare_data()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    datamodule.setup("test")
    loader = datamodule.test_dataloader()
    if isinstance(loader, dict):
        loader = next(iter(loader.values()))
    if isinstance(loader, (list, tuple)):
        loader = loader[0]
    if not isinstance(loader, DataLoader):
        raise TypeError(
            f"{type(datamodule).__name__}.test_dataloader() gave a {type(loader).__name__}: evaluate needs a "
            "torch DataLoader over a dataset of (image, label) pairs"
        )
    return loader.dataset, loader
