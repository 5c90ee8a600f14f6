"""A Free-m training killed with SIGKILL mid-run leaves only checkpoints that load, and resumes from last.ckpt in a
new process to its end."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from freeadv_pl.modules._perturbation import CHECKPOINT_KEY

TESTS = Path(__file__).resolve().parent
EPOCHS, STEPS_PER_EPOCH = 3, 10 * 2  # 10 batches of 4, 2 replays
KILL_AFTER_STEP = 12  # some steps after the first checkpoint (step 4), long before the end (step 60)

TRAIN_SCRIPT = """
import sys
import time
from pathlib import Path
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader
sys.path.insert(0, {tests!r})
from conftest import quiet_trainer, tiny_cnn, tiny_dataset
from freeadv_pl import FreeAdversarialModule

out = Path({out!r})


class Pace(Callback):
    \"\"\"Slows the training down so that it can be killed mid-run; writes its step and δ where the parent reads them.\"\"\"

    def on_train_start(self, trainer, module):
        start = None if module.delta is None else module.delta.clone()
        torch.save(dict(step=trainer.global_step, delta=start), out / "start.pt")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        (out / "progress.txt").write_text(str(trainer.global_step))
        time.sleep(0.2)


module = FreeAdversarialModule(tiny_cnn(), 3, replays=2, epsilon=0.1)
saver = ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, every_n_train_steps=4, filename="{{step}}")
trainer = quiet_trainer(max_epochs={epochs}, enable_checkpointing=True, callbacks=[Pace(), saver])
trainer.fit(module, DataLoader(tiny_dataset(40), batch_size=4), ckpt_path=sys.argv[1] if len(sys.argv) > 1 else None)
print(f"DONE {{trainer.global_step}}", flush=True)
"""


def _progress(path: Path) -> int:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):  # not written yet, or caught in the middle of a write
        return -1


def test_a_killed_run_leaves_loadable_checkpoints_and_resumes_to_the_end(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT.format(tests=str(TESTS), out=str(tmp_path), epochs=EPOCHS))
    with (tmp_path / "killed.log").open("w") as log:
        process = subprocess.Popen([sys.executable, str(script)], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 120
            while _progress(tmp_path / "progress.txt") < KILL_AFTER_STEP:
                assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the training did not get going within 2 minutes"
                time.sleep(0.02)
            process.send_signal(signal.SIGKILL)
            assert process.wait(timeout=30) == -signal.SIGKILL
        finally:
            if process.poll() is None:
                process.kill()
    killed_at = _progress(tmp_path / "progress.txt")
    assert killed_at < EPOCHS * STEPS_PER_EPOCH, "killed before the end"

    files = sorted((tmp_path / "checkpoints").iterdir())
    assert {path.name for path in files} >= {"last.ckpt"} and all(path.suffix == ".ckpt" for path in files)
    for path in files:
        checkpoint = torch.load(path, weights_only=True)  # raises on a truncated or corrupt file
        assert KILL_AFTER_STEP - 4 <= checkpoint["global_step"] <= killed_at
        assert checkpoint[CHECKPOINT_KEY]["per_rank"][0].abs().max() > 0
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)

    resumed = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "checkpoints" / "last.ckpt")],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"DONE {EPOCHS * STEPS_PER_EPOCH}" in resumed.stdout
    start = torch.load(tmp_path / "start.pt", weights_only=True)
    assert start["step"] == last["global_step"]
    assert torch.equal(start["delta"], last[CHECKPOINT_KEY]["per_rank"][0])
