"""The DataModule base shared by every dataset of the package."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from freeadv_pl._checks import check_int
from freeadv_pl._lightning_compat import epoch_to_run
from freeadv_pl._step_random import step_seed
from freeadv_pl.data.augmentation import RandomCropFlip

Transform = Callable[[Any], Any]


class TransformedSubset(Dataset):
    """The examples ``indices`` of ``dataset``, their images (first item of each example) through ``transform``;
    with ``return_index``, each example is ``(image, label, index)``, ``index`` its position in this subset.

    Training and validation examples drawn from one split share the stored data but not the transform (the
    validation images are not augmented).
    """

    def __init__(
        self, dataset: Dataset, indices: Sequence[int], transform: Transform | None = None, return_index: bool = False
    ) -> None:
        self.dataset = dataset
        self.indices = indices
        self.transform = transform
        self.return_index = return_index

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        image, label = self.dataset[self.indices[index]]
        image = image if self.transform is None else self.transform(image)
        return (image, label, index) if self.return_index else (image, label)


class VisionDataModule(LightningDataModule):
    """Images in [0, 1] (never normalized here: the model normalizes) with a seeded train/validation split.

    Subclasses set the attributes ``num_classes``, ``mean``, ``std`` and ``image_shape`` (the CLI links
    ``num_classes``, ``mean`` and ``std`` into the model), implement :meth:`load_split` and may override
    :meth:`train_transform` (augmentation) and :meth:`eval_transform`.

    Args:
        data_dir: folder holding the dataset files (each dataset says what it looks for when None).
        batch_size: training batch size.
        eval_batch_size: validation/test batch size; None means ``batch_size``.
        val_size: examples held out of the training set for validation, chosen with ``seed``; 0 validates on the
            test split instead.
        train_size: keep only this many training examples (after the split), for quick runs; None keeps all.
        test_size: keep only this many test examples (a seeded random subset), for quick runs; None keeps all.
        seed: seed of the train/validation split and of the ``train_size``/``test_size`` subsets.
        num_workers: DataLoader worker processes (persistent between epochs when > 0).
        pin_memory: pin host memory for faster host-to-GPU copies.
        drop_last: drop the last partial training batch.
        download: allow :meth:`prepare_data` to download the dataset where there is a network.
        batch_size_is_global: ``batch_size`` and ``eval_batch_size`` are totals over all the Trainer's processes
            (DDP): each of the ``world_size`` processes loads ``batch_size / world_size``, so a config keeps the
            same total batch (and learning rate) on any number of GPUs. False: they are per process.
        return_index: training batches are ``(x, y, index)``, ``index`` each image's position in ``train_set``, as
            ``FreeAdversarialModule(delta_memory="example")`` needs. A crop and flip (:meth:`batch_augmentation`)
            then run on the batch's device, given ``fit(datamodule=...)``, and the batch is ``(x, y, index,
            crop_flip)`` (docs/design.md, "Augmentation and the frame of δ"). Validation and test batches stay
            ``(x, y)``.
        seeded_order: the training order of epoch e is a permutation of ``(seed, e)`` (``DistributedSampler``'s, also
            in one process), as exact resume needs (docs/design.md, "Exact resume"); False: ``shuffle=True`` from the
            global RNG. The training loader is a torchdata ``StatefulDataLoader`` either way.

    Raises:
        ValueError: on a negative ``val_size``, a ``train_size``/``test_size`` < 1 or a batch size < 1; in
            ``setup`` when ``val_size`` leaves no training example; in a dataloader when ``batch_size_is_global``
            and the world size does not divide the batch size.
    """

    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_shape: tuple[int, int, int]

    def __init__(
        self,
        data_dir: str | Path | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_size: int = 5000,
        train_size: int | None = None,
        test_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
        download: bool = False,
        batch_size_is_global: bool = False,
        return_index: bool = False,
        seeded_order: bool = True,
    ) -> None:
        super().__init__()
        self.data_dir = None if data_dir is None else Path(data_dir).expanduser()
        self.batch_size = check_int(batch_size, "batch_size", minimum=1)
        self.eval_batch_size = (
            batch_size if eval_batch_size is None else check_int(eval_batch_size, "eval_batch_size", minimum=1)
        )
        self.val_size = check_int(val_size, "val_size", minimum=0)
        self.train_size = None if train_size is None else check_int(train_size, "train_size", minimum=1)
        self.test_size = None if test_size is None else check_int(test_size, "test_size", minimum=1)
        self.seed = seed
        self.num_workers = check_int(num_workers, "num_workers", minimum=0)
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.download = download
        self.batch_size_is_global = batch_size_is_global
        self.return_index = return_index
        self.seeded_order = seeded_order
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._batch_augmentation = self.batch_augmentation() if return_index else None
        if self._batch_augmentation is not None:  # reseeded per batch (step_seed): exact resume
            self._batch_augmentation.generator = torch.Generator()

    def load_split(self, train: bool) -> Dataset:
        """The full training (``train=True``) or test split, as a dataset of ``(image in [0, 1], label)``."""
        raise NotImplementedError

    def train_transform(self) -> Transform | None:
        """What is applied to each training image (augmentation); None: the stored image as it is."""
        return None

    def eval_transform(self) -> Transform | None:
        """What is applied to each validation and test image; None: the stored image as it is."""
        return None

    def batch_augmentation(self) -> RandomCropFlip | None:
        """With ``return_index``, the training augmentation applied to whole batches on their device (it replaces
        the crop and flip of :meth:`train_transform`); None: none."""
        return None

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self._batch_augmentation is None or self.trainer is None or not self.trainer.training or len(batch) != 3:
            return batch
        x, y, index = batch
        trainer = self.trainer
        self._batch_augmentation.generator.manual_seed(step_seed(self.seed, trainer.global_rank, trainer.global_step))
        crop_flip = self._batch_augmentation.draw(x)
        return crop_flip.apply(x), y, index, crop_flip

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate") and self.train_set is None:
            self._split_training_set(self.load_split(train=True))
        needs_test_set = stage in ("test", "predict") or (stage in ("fit", "validate") and self.val_size == 0)
        if needs_test_set and self.test_set is None:
            self._subset_test_set(self.load_split(train=False))

    def train_dataloader(self) -> DataLoader:
        return self._dataloader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._dataloader(self.val_set if self.val_size else self.test_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._dataloader(self.test_set, train=False)

    def _download_with_torchvision(self, dataset_class: Callable[..., Dataset], root: Path, how_else: str) -> None:
        """Download both splits with a torchvision dataset class; if that fails (no network), say how else to get
        the files."""
        try:
            for train in (True, False):
                dataset_class(str(root), train=train, download=True)
        except (OSError, RuntimeError) as error:  # URLError is an OSError; torchvision's MNIST raises RuntimeError
            raise RuntimeError(f"download=True could not download into {root}: {error}. {how_else}") from error

    def _split_training_set(self, full: Dataset) -> None:
        total = len(full)
        if self.val_size >= total:
            raise ValueError(f"val_size={self.val_size} leaves no training example: the training split has {total}")
        order = torch.randperm(total, generator=torch.Generator().manual_seed(self.seed)).tolist()
        train_indices = order[self.val_size :]
        if self.train_size is not None:
            train_indices = train_indices[: self.train_size]
        self.train_set = TransformedSubset(full, train_indices, self.train_transform(), self.return_index)
        self.val_set = TransformedSubset(full, order[: self.val_size], self.eval_transform()) if self.val_size else None

    def _subset_test_set(self, full: Dataset) -> None:
        indices: Sequence[int] = range(len(full))
        if self.test_size is not None and self.test_size < len(full):
            generator = torch.Generator().manual_seed(self.seed)
            indices = sorted(torch.randperm(len(full), generator=generator)[: self.test_size].tolist())
        self.test_set = TransformedSubset(full, indices, self.eval_transform())

    def _per_process(self, batch_size: int, name: str) -> int:
        world_size = self.trainer.world_size if self.batch_size_is_global and self.trainer is not None else 1
        if batch_size % world_size:
            raise ValueError(
                f"{name}={batch_size} is a total over {world_size} processes (batch_size_is_global=True) but is not "
                f"divisible by {world_size}: set {name} to a multiple of {world_size}."
            )
        return batch_size // world_size

    def _dataloader(self, dataset: Dataset | None, *, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its dataloaders are requested")
        settings: dict[str, Any] = {"num_workers": self.num_workers, "pin_memory": self.pin_memory}
        settings["persistent_workers"] = self.num_workers > 0
        if not train:
            return DataLoader(dataset, self._per_process(self.eval_batch_size, "eval_batch_size"), **settings)
        if self.seeded_order:
            world_size, rank = (1, 0) if self.trainer is None else (self.trainer.world_size, self.trainer.global_rank)
            settings["sampler"] = DistributedSampler(dataset, world_size, rank, shuffle=True, seed=self.seed)
        else:
            settings["shuffle"] = True
        batch_size = self._per_process(self.batch_size, "batch_size")
        loader = _TrainingLoader(dataset, batch_size, drop_last=self.drop_last, **settings)
        if self.trainer is not None and hasattr(self.trainer, "fit_loop"):
            epoch, loader.fresh_epoch = epoch_to_run(self.trainer)
            if self.seeded_order:  # before the first iterator, which a resumed fit makes before calling set_epoch
                settings["sampler"].set_epoch(epoch)
        return loader


class _TrainingLoader(StatefulDataLoader):
    """The training loader: Lightning keeps its position in checkpoints and gives it back on resume, except where the
    resumed fit starts a new epoch (``fresh_epoch``)."""

    fresh_epoch = False

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self.fresh_epoch:
            super().load_state_dict(state_dict)
