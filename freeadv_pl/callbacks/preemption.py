"""Write a checkpoint at the next clean point when the job is told to stop (SIGTERM, SLURM's warning signal)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; the process exits with 128 + the signal's number."""


class PreemptionCheckpoint(Callback):
    """On SIGTERM (Kubernetes, spot instances) or SLURM's warning signal, finish the current batch (all of Free-m's
    m replays), write a checkpoint, print where it is, and exit with status 128 + the signal's number.

    The checkpoint is ``<dirpath>/last-preempted.ckpt``, written under a temporary name in the same folder and renamed
    (atomic on one file system). ``ckpt_path="last"`` (``freeadv_pl fit --config ... --ckpt_path last``) finds it,
    since it is in the ``ModelCheckpoint``'s folder; the resumed run continues exactly (README, "Checkpoints and
    resuming"). Under DDP every process checks, once per batch, whether any process got the signal (one all-reduce of a
    flag), so all stop after the same batch. Under SLURM the warning signal is ``SLURMEnvironment``'s
    ``requeue_signal`` (SIGUSR1 by default: ``#SBATCH --signal=USR1@120``), and with its ``auto_requeue`` (the
    default) process 0 requeues the job with ``scontrol requeue`` after the checkpoint is written; Lightning's own
    handler, which would write a checkpoint in the middle of a batch's replays, is not installed.

    Args:
        dirpath: the checkpoint's folder; None: the first ``ModelCheckpoint``'s, else
            ``<default_root_dir>/checkpoints``.
        signals: the signals to act on; None: SIGTERM and the requeue signal (SIGUSR1 outside SLURM).

    Raises:
        ValueError: on a signal name that this system does not have.

    Example:
        ``Trainer(callbacks=[ModelCheckpoint(save_last=True), PreemptionCheckpoint()])``; in a config::

            trainer:
              callbacks:
                - class_path: freeadv_pl.PreemptionCheckpoint
    """

    def __init__(self, dirpath: str | os.PathLike | None = None, signals: list[str] | None = None) -> None:
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.signals = None if signals is None else [_signal(name) for name in signals]
        self.last_path: Path | None = None
        self._received: int | None = None
        self._previous: dict[int, Any] = {}

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return
        for signum in self.signals or [signal.SIGTERM, _requeue_signal(trainer)]:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        received = self._received is not None
        if trainer.world_size > 1:  # every process stops after the same batch
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if not received:
            return
        signum = self._received or signal.SIGTERM  # a process that got no signal itself
        path = self._checkpoint_path(trainer)
        partial = path.with_name(f".{path.name}.partial")
        trainer.save_checkpoint(partial)  # collective: every process builds the checkpoint, process 0 writes it
        if trainer.is_global_zero:
            os.replace(partial, path)
        trainer.strategy.barrier("PreemptionCheckpoint")
        self.last_path = path
        name = signal.Signals(signum).name
        rank_zero_info(
            f"PreemptionCheckpoint: {name} received; finished batch {batch_idx} of epoch {trainer.current_epoch} "
            f"(trainer.global_step {trainer.global_step}) and wrote {path}. Resume with --ckpt_path last "
            f"(or Trainer.fit(..., ckpt_path={str(path)!r}))."
        )
        if trainer.is_global_zero and signum == _requeue_signal(trainer) and _auto_requeue(trainer):
            _requeue()
        raise Preempted(128 + signum)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._received = signum
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)

    def _checkpoint_path(self, trainer: Trainer) -> Path:
        folder = self.dirpath
        if folder is None:
            folder = next(
                (Path(c.dirpath) for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath),
                Path(trainer.default_root_dir) / "checkpoints",
            )
        folder.mkdir(parents=True, exist_ok=True)
        return folder / "last-preempted.ckpt"


def _signal(name: str) -> int:
    number = getattr(signal, name, None)
    if not isinstance(number, signal.Signals):
        raise ValueError(  # noqa: TRY004  (a bad name, not a bad type)
            f"unknown signal {name!r}: use names like 'SIGTERM' or 'SIGUSR1'"
        )
    return number


def _slurm(trainer: Trainer) -> SLURMEnvironment | None:
    environment = getattr(trainer.strategy, "cluster_environment", None)
    return environment if isinstance(environment, SLURMEnvironment) else None


def _requeue_signal(trainer: Trainer) -> int:
    environment = _slurm(trainer)
    return (environment.requeue_signal if environment is not None else None) or signal.SIGUSR1


def _auto_requeue(trainer: Trainer) -> bool:
    environment = _slurm(trainer)
    return environment.auto_requeue if environment is not None else SLURMEnvironment.detect()


def _requeue() -> None:
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job:
        return
    result = subprocess.run(["scontrol", "requeue", job], check=False, capture_output=True, text=True)
    if result.returncode:
        rank_zero_warn(f"PreemptionCheckpoint: `scontrol requeue {job}` failed: {result.stderr.strip()}")
    else:
        rank_zero_info(f"PreemptionCheckpoint: requeued SLURM job {job}.")
