"""Interrupt a run at any optimizer step and resume it to the uninterrupted run's final state, bitwise on the CPU:
weights, optimizer state, LR, δ (or the δ bank) and global step. Each run is ``tests/resume_run.py`` in its own
process (shuffled seeded order, stateful loader, checkpoints after every optimizer step and every epoch)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from dataset_files import write_fashion_mnist
from resume_run import TinyData
from torchdata.stateful_dataloader import StatefulDataLoader

SCRIPT = Path(__file__).resolve().parent / "resume_run.py"
STEPS_PER_EPOCH = {1: 10, 2: 6}  # Free-2 on 40 images in batches of 8: 5 batches (3 per process under 2-process DDP)
PICK = random.Random(18)  # the seeded random optimizer steps at which runs are interrupted


def run(out: Path, method: str, *args: str, devices: int = 1) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), "--method", method, "--out", str(out), "--devices", str(devices), *args]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPT.parent), *sys.path])}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment, check=False)


def finished(out: Path, method: str, *args: str, devices: int = 1) -> list[dict]:
    result = run(out, method, *args, devices=devices)
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(out / f"final_rank{rank}.pt", weights_only=True) for rank in range(devices)]


def assert_bitwise_equal(resumed: dict, uninterrupted: dict) -> None:
    assert resumed["global_step"] == uninterrupted["global_step"]
    assert resumed["lr"] == uninterrupted["lr"]
    for key, value in uninterrupted["weights"].items():
        assert torch.equal(resumed["weights"][key], value), key
    for key, state in uninterrupted["optimizer"].items():
        assert torch.equal(resumed["optimizer"][key]["momentum_buffer"], state["momentum_buffer"]), key
    if uninterrupted["delta"] is None:
        assert resumed["delta"] is None
    else:
        assert torch.equal(resumed["delta"], uninterrupted["delta"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted run of each (method, processes), made once; its folder holds its checkpoints."""
    runs: dict[tuple[str, int], tuple[Path, list[dict]]] = {}

    def get(method: str, devices: int = 1) -> tuple[Path, list[dict]]:
        if (method, devices) not in runs:
            out = tmp_path_factory.mktemp(f"{method}-{devices}")
            runs[method, devices] = (out, finished(out, method, devices=devices))
        return runs[method, devices]

    return get


def mid_epoch_step(devices: int = 1) -> int:
    """A seeded random optimizer step after a batch's replays, inside an epoch other than the first."""
    per_epoch = STEPS_PER_EPOCH[devices]
    return PICK.choice([step for step in range(per_epoch + 2, 2 * per_epoch, 2)])


def test_free_resumes_bitwise_from_an_epoch_end_a_mid_epoch_and_an_epochs_last_batch_checkpoint(
    uninterrupted, tmp_path
):
    out, (full,) = uninterrupted("free")
    assert full["lr"] == pytest.approx(0.1 / 2**3)  # the epoch-interval schedule: halved at each of the 3 epochs' ends
    checkpoints = {"epoch": "epochs/epoch=0.ckpt", "mid": f"steps/step={mid_epoch_step()}.ckpt"}
    checkpoints["last-batch"] = f"steps/step={2 * STEPS_PER_EPOCH[1]}.ckpt"  # before epoch 1's end: Lightning skips it
    for name, checkpoint in checkpoints.items():
        (resumed,) = finished(tmp_path / name, "free", "--resume", str(out / checkpoint))
        assert_bitwise_equal(resumed, full)


def test_the_delta_bank_resumes_bitwise_from_a_mid_epoch_checkpoint(uninterrupted, tmp_path):
    out, (full,) = uninterrupted("free-example")
    assert full["delta"].shape[0] == 40  # the bank: one δ per training image
    (resumed,) = finished(tmp_path, "free-example", "--resume", str(out / f"steps/step={mid_epoch_step()}.ckpt"))
    assert_bitwise_equal(resumed, full)


def test_fgsm_rs_with_uniform_starts_resumes_bitwise_from_a_mid_epoch_checkpoint(uninterrupted, tmp_path):
    out, (full,) = uninterrupted("fgsm")
    step = PICK.choice(range(7, 10))  # one optimizer step per batch: any step is a batch's end
    (resumed,) = finished(tmp_path, "fgsm", "--resume", str(out / f"steps/step={step}.ckpt"))
    assert_bitwise_equal(resumed, full)


def test_an_l2_trades_free_run_and_an_l2_fgsm_rs_run_resume_bitwise_from_a_mid_epoch_checkpoint(
    uninterrupted, tmp_path
):
    out, (full,) = uninterrupted("free-l2-trades")
    assert full["delta"].flatten(1).norm(dim=1).max() <= 0.5 + 1e-6
    (resumed,) = finished(
        tmp_path / "free", "free-l2-trades", "--resume", str(out / f"steps/step={mid_epoch_step()}.ckpt")
    )
    assert_bitwise_equal(resumed, full)
    out, (full,) = uninterrupted("fgsm-l2")
    (resumed,) = finished(
        tmp_path / "fgsm", "fgsm-l2", "--resume", str(out / f"steps/step={PICK.choice(range(7, 10))}.ckpt")
    )
    assert_bitwise_equal(resumed, full)


def test_sigterm_in_the_middle_of_a_batchs_replays_checkpoints_that_batch_and_resumes_bitwise(uninterrupted, tmp_path):
    _, (full,) = uninterrupted("free")
    step = mid_epoch_step() + 1  # between the two replays of a batch
    interrupted = run(tmp_path / "interrupted", "free", "--sigterm-at", str(step))
    assert interrupted.returncode == 128 + 15, interrupted.stderr[-4000:]
    assert "PreemptionCheckpoint: SIGTERM received; finished batch" in interrupted.stdout + interrupted.stderr
    checkpoint = tmp_path / "interrupted" / "preempted" / "last-preempted.ckpt"
    assert torch.load(checkpoint, weights_only=True)["global_step"] == step + 1  # after the batch's second replay
    (resumed,) = finished(tmp_path / "resumed", "free", "--resume", str(checkpoint))
    assert_bitwise_equal(resumed, full)


def test_two_process_ddp_resumes_bitwise_on_both_processes_from_a_mid_epoch_checkpoint(uninterrupted, tmp_path):
    out, full = uninterrupted("free", devices=2)
    checkpoint = out / f"steps/step={mid_epoch_step(devices=2)}.ckpt"
    resumed = finished(tmp_path, "free", "--resume", str(checkpoint), devices=2)
    for rank in range(2):
        assert_bitwise_equal(resumed[rank], full[rank])
    assert not torch.equal(full[0]["delta"], full[1]["delta"]), "each process keeps its own δ"


def test_a_checkpoint_from_before_exact_resume_loads_with_a_warning(uninterrupted, tmp_path):
    out, _ = uninterrupted("free")
    checkpoint = torch.load(out / "epochs/epoch=0.ckpt", weights_only=True)
    del checkpoint["freeadv_pl_random"]
    checkpoint["loops"]["fit_loop"]["state_dict"].pop("combined_loader", None)
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    result = run(tmp_path / "resumed", "free", "--resume", str(old))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "written by an older freeadv_pl" in " ".join(result.stderr.split())


def epoch_order(seed: int, epoch: int, **kwargs) -> list[int]:
    data = TinyData(batch_size=8, val_size=0, seed=seed, **kwargs)
    data.setup("fit")
    loader = data.train_dataloader()
    if data.seeded_order:
        loader.sampler.set_epoch(epoch)
    return [int(i) for x, y in loader for i in (x.flatten(1)[:, 0] * 1e6).long()]  # each image's first pixel


def test_the_training_order_is_a_function_of_the_seed_and_the_epoch_not_of_the_global_rng():
    torch.manual_seed(1)
    first = epoch_order(seed=0, epoch=1)
    torch.manual_seed(2)
    assert epoch_order(seed=0, epoch=1) == first
    assert sorted(first) == sorted(epoch_order(seed=0, epoch=2)) and first != epoch_order(seed=0, epoch=2)
    assert first != epoch_order(seed=1, epoch=1)
    data = TinyData(batch_size=8, val_size=0)
    data.setup("fit")
    assert isinstance(data.train_dataloader(), StatefulDataLoader)


def test_seeded_order_false_shuffles_with_the_global_rng_in_a_stateful_loader():
    torch.manual_seed(1)
    first = epoch_order(seed=0, epoch=0, seeded_order=False)
    torch.manual_seed(1)
    assert epoch_order(seed=0, epoch=3, seeded_order=False) == first  # no epoch in it: the global RNG alone
    torch.manual_seed(2)
    assert epoch_order(seed=0, epoch=0, seeded_order=False) != first


def test_the_command_line_stops_on_sigterm_and_resumes_with_ckpt_path_last(tmp_path):
    write_fashion_mnist(tmp_path / "data", n_train=600, n_test=100)
    configs = Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist"
    command = [sys.executable, "-m", "freeadv_pl", "fit", "--config", str(configs / "free.yaml")]
    command += ["--config", str(configs / "quick.yaml"), "--data.init_args.data_dir", "data", "--ckpt_path", "last"]
    command += ["--trainer.default_root_dir", "run", "--trainer.max_epochs", "3", "--trainer.limit_train_batches", "8"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.append(process.stdout.read()), daemon=True)
    reader.start()  # drained all along, so that a full pipe never blocks the run
    # Epoch 0 is done once its last.ckpt is written (whatever progress bar Lightning picks: rich or tqdm).
    while process.poll() is None and not any((tmp_path / "run").rglob("last.ckpt")):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    returncode = process.wait(timeout=300)
    reader.join(timeout=60)
    assert returncode == 128 + 15, "".join(output)[-4000:]
    checkpoint = next((tmp_path / "run").rglob("last-preempted.ckpt"))
    stopped_at = torch.load(checkpoint, weights_only=True)["global_step"]
    assert 8 * 4 <= stopped_at < 3 * 8 * 4 and stopped_at % 4 == 0  # in epoch 1 or 2, after a whole batch of Free-4

    resumed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"Restored all states from the checkpoint at {checkpoint.resolve()}" in resumed.stdout + resumed.stderr
    final = max((tmp_path / "run").rglob("last.ckpt"), key=lambda path: path.stat().st_mtime)
    assert torch.load(final, weights_only=True)["global_step"] == 3 * 8 * 4
