"""RobustEvaluation: logged and monitorable in fit, works under validate/test, agrees with torchattacks and with
itself under 2-process DDP, restarts never help the model, and the sanity warnings fire."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchattacks
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from conftest import banded_dataset, quiet_trainer, tiny_cnn, tiny_dataset
from dataset_files import write_fashion_mnist
from freeadv_pl import (
    AttackSpec,
    FashionMNISTDataModule,
    FreeAdversarialModule,
    NaturalModule,
    RobustEvaluation,
    SmallCNN,
    count_correct,
    robust_accuracy,
)

TESTS = Path(__file__).resolve().parent
EPSILON = 0.1


def trained_tiny_module(n: int = 256, epochs: int = 15) -> NaturalModule:
    """A tiny CNN trained on :func:`banded_dataset`, so that the attacks have accuracy to remove."""
    module = NaturalModule(tiny_cnn(), 3, optimizer=lambda params: torch.optim.Adam(params, lr=0.01))
    torch.manual_seed(0)  # the shuffling
    loader = DataLoader(banded_dataset(n, seed=1), batch_size=32, shuffle=True)
    quiet_trainer(max_epochs=epochs).fit(module, train_dataloaders=loader)
    return module


def test_fit_logs_robust_accuracy_every_epoch_and_a_checkpoint_monitors_it(tmp_path):
    write_fashion_mnist(tmp_path / "data", n_train=400, n_test=50)
    data = FashionMNISTDataModule(tmp_path / "data", batch_size=50, val_size=101)
    module = FreeAdversarialModule(
        SmallCNN(width=4, hidden=16), 10, replays=2, epsilon=EPSILON, mean=data.mean, std=data.std
    )
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/robust/pgd20", mode="max")
    trainer = quiet_trainer(
        max_epochs=2,
        logger=CSVLogger(tmp_path, name="logs"),
        enable_checkpointing=True,
        callbacks=[RobustEvaluation(num_samples=101, batch_size=40), checkpoint],
    )
    trainer.fit(module, datamodule=data)
    rows = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    column = header.index("val/robust/pgd20")
    logged = [float(row.split(",")[column]) for row in rows[1:] if row.split(",")[column]]
    assert len(logged) == 2, "one value per epoch"
    assert checkpoint.best_model_score.item() == pytest.approx(max(logged))
    assert 0 <= min(logged) and max(logged) <= 1
    natural = trainer.callback_metrics["val/robust/natural"].item()
    assert trainer.callback_metrics["val/robust/pgd20"].item() <= natural
    assert trainer.callbacks[0].results["validate"]["examples"] == 101


@pytest.mark.parametrize("random_start", [False, True], ids=["shared-start", "own-starts"])
def test_agrees_with_torchattacks_pgd(random_start):
    module = trained_tiny_module()
    data = banded_dataset(400, seed=2)
    epsilon, step_size = 0.03, 0.01
    attack = AttackSpec(steps=10, step_size=step_size, random_start=random_start)
    callback = RobustEvaluation([AttackSpec(steps=0), attack], epsilon=epsilon, num_samples=None, batch_size=64)
    trainer = quiet_trainer(callbacks=[callback])
    (result,) = trainer.validate(module, DataLoader(data, batch_size=50), verbose=False)
    ours = result["val/robust/pgd10"]

    module.eval()
    reference = torchattacks.PGD(module, eps=epsilon, alpha=step_size, steps=10, random_start=random_start)
    torch.manual_seed(123)
    correct = 0
    for x, y in DataLoader(data, batch_size=64):
        correct += int((module(reference(x, y)).argmax(dim=1) == y).sum())
    theirs = correct / len(data)
    assert result["val/robust/natural"] - ours > 0.2, "the attack removes accuracy (the comparison means something)"
    assert ours > 0.1, "and leaves some (so that the two can differ)"
    if random_start:
        assert ours == pytest.approx(theirs, abs=0.04)
    else:
        assert round(ours * len(data)) == correct, "the same examples broken, from the same start δ = 0"


def test_validate_and_test_run_under_inference_mode_and_report(tmp_path, capsys):
    module = trained_tiny_module()
    suite = [AttackSpec(steps=0), AttackSpec(steps=5, step_size=0.03), AttackSpec(steps=5, step_size=0.03, loss="cw")]
    callback = RobustEvaluation(suite, epsilon=EPSILON, num_samples=30, test_num_samples=40)
    trainer = quiet_trainer(callbacks=[callback], default_root_dir=tmp_path)
    loader = DataLoader(banded_dataset(60, seed=3), batch_size=16)
    (validated,) = trainer.validate(module, loader, verbose=False)
    assert {"val/robust/natural", "val/robust/pgd5", "val/robust/cw5"} <= set(validated)
    assert callback.results["validate"]["examples"] == 30
    (tested,) = trainer.test(module, loader, verbose=False)
    assert {"test/robust/natural", "test/robust/pgd5", "test/robust/cw5"} <= set(tested)
    printed = capsys.readouterr().out
    assert "on 40 test images" in printed and "| natural | PGD-5 | CW-5 | worst case |" in printed
    assert "CW-5 (CW loss, ε = 0.1, step 0.03, 1 random start)" in printed
    saved = json.loads((tmp_path / "robust_accuracy.json").read_text())
    assert [row["key"] for row in saved["attacks"]] == ["natural", "pgd5", "cw5", "worst"]
    assert saved["attacks"][1]["accuracy"] == pytest.approx(tested["test/robust/pgd5"])
    assert (tmp_path / "robust_accuracy.csv").read_text().startswith("attack,key,accuracy,description")


def test_the_worst_case_column_is_the_per_example_minimum(tmp_path):
    module = trained_tiny_module()
    suite = [AttackSpec(steps=0), AttackSpec(steps=5, step_size=0.03), AttackSpec(steps=5, step_size=0.03, loss="cw")]
    callback = RobustEvaluation(suite, epsilon=EPSILON, test_num_samples=40, seed=3)
    dataset = banded_dataset(60, seed=3)
    trainer = quiet_trainer(callbacks=[callback], default_root_dir=tmp_path)  # the report's files land there
    (tested,) = trainer.test(module, DataLoader(dataset, batch_size=16), verbose=False)
    # By hand: the seeded subset in batches of 16, batch b's starts seeded with seed + b, an example robust only if
    # every column classifies it correctly.
    chosen = sorted(torch.randperm(60, generator=torch.Generator().manual_seed(3))[:40].tolist())
    module.eval()
    robust = []
    for number, start in enumerate(range(0, 40, 16)):
        x, y = dataset.tensors[0][chosen[start : start + 16]], dataset.tensors[1][chosen[start : start + 16]]
        unbroken = torch.ones_like(y, dtype=torch.bool)
        for attack in suite:
            x_adv = attack(module, x, y, EPSILON, torch.Generator().manual_seed(3 + number))
            unbroken &= module(x_adv).argmax(dim=1) == y
        robust.append(unbroken)
    expected = float(torch.cat(robust).float().mean())
    assert tested["test/robust/worst"] == pytest.approx(expected)
    assert all(tested["test/robust/worst"] <= tested[f"test/robust/{attack.key}"] for attack in suite)
    assert tested["test/robust/worst"] < tested["test/robust/natural"], "the attacks remove some accuracy"


def test_robust_accuracy_gives_the_callbacks_numbers_on_the_same_batches():
    module = trained_tiny_module()
    loader = DataLoader(banded_dataset(70, seed=6), batch_size=16)
    suite = [AttackSpec(steps=0), AttackSpec(steps=5, step_size=0.03, restarts=2), AttackSpec(steps=5, loss="cw")]
    callback = RobustEvaluation(suite, epsilon=EPSILON, num_samples=None, seed=7)
    (logged,) = quiet_trainer(callbacks=[callback]).validate(module, loader, verbose=False)
    module.train()
    ours = robust_accuracy(module, loader, suite, EPSILON, seed=7)
    assert module.training, "the model's mode is given back"
    assert ours["examples"] == 70 and set(ours) == {"natural", "pgd5x2", "cw5", "worst", "examples"}
    for key in ("natural", "pgd5x2", "cw5", "worst"):
        assert ours[key] == pytest.approx(logged[f"val/robust/{key}"], abs=1e-7)
    assert ours["worst"] <= ours["cw5"] < ours["natural"], "the attacks remove accuracy"
    assert ours["natural"] == count_correct(module, loader)[0] / 70
    with pytest.raises(ValueError, match="attacks='pgd7' is not a preset"):
        robust_accuracy(module, loader, "pgd7", EPSILON)
    with pytest.raises(ValueError, match="got no examples"):
        robust_accuracy(module, [], "pgd20", EPSILON)


def test_restarts_never_do_better_than_their_first_start():
    module = trained_tiny_module()
    loader = DataLoader(banded_dataset(120, seed=4), batch_size=32)
    for seed in range(3):
        suite = [AttackSpec(steps=3, step_size=0.02), AttackSpec(steps=3, step_size=0.02, restarts=5)]
        callback = RobustEvaluation(suite, epsilon=EPSILON, num_samples=None, seed=seed)
        (result,) = quiet_trainer(callbacks=[callback]).validate(module, loader, verbose=False)
        assert result["val/robust/pgd3x5"] <= result["val/robust/pgd3"]


def test_every_n_epochs_and_the_sanity_check_are_respected(tmp_path):
    module = FreeAdversarialModule(tiny_cnn(), 3, replays=2, epsilon=EPSILON)
    callback = RobustEvaluation(num_samples=8, every_n_epochs=2)
    runs = []
    original = callback._run
    callback._run = lambda trainer, pl_module, stage: (
        runs.append(trainer.current_epoch) or original(trainer, pl_module, stage)
    )
    loader = DataLoader(tiny_dataset(16), batch_size=8)
    trainer = quiet_trainer(max_epochs=4, num_sanity_val_steps=1, callbacks=[callback])
    trainer.fit(module, loader, loader)
    assert runs == [1, 3]


class Softmax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_cnn()

    def forward(self, x):
        return self.net(x).softmax(dim=1)


class Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_cnn()

    def forward(self, x):
        return self.net((x * 4).round() / 4)  # a step function of the input: zero gradient everywhere


@pytest.mark.parametrize(
    "backbone, match",
    [
        pytest.param(Softmax, "sum to one like probabilities.*Remove the final softmax", id="probabilities"),
        pytest.param(Masked, "zero gradient with respect to every input.*masks its gradients", id="masking"),
    ],
)
def test_sanity_warnings(backbone, match):
    module = NaturalModule(backbone(), 3)
    callback = RobustEvaluation(num_samples=8, epsilon=EPSILON)
    with pytest.warns(UserWarning, match=match):
        quiet_trainer(callbacks=[callback]).validate(module, DataLoader(tiny_dataset(8), batch_size=8), verbose=False)


@pytest.mark.parametrize(
    "make, match",
    [
        pytest.param(lambda: RobustEvaluation("cifar10"), "attacks='cifar10' is not a preset: use one of", id="preset"),
        pytest.param(lambda: RobustEvaluation([]), "non-empty list of AttackSpec", id="empty"),
        pytest.param(lambda: RobustEvaluation([AttackSpec(), AttackSpec()]), "same name.*distinct `name`s", id="dup"),
        pytest.param(
            lambda: RobustEvaluation([AttackSpec(name="examples")]), "one named 'worst' or 'examples'", id="reserved"
        ),
        pytest.param(lambda: RobustEvaluation(num_samples=0), "num_samples must be an integer ≥ 1", id="samples"),
        pytest.param(lambda: AttackSpec(loss="l2"), "loss must be one of 'ce', 'cw', got 'l2'", id="loss"),
        pytest.param(lambda: AttackSpec(restarts=0), "restarts must be an integer ≥ 1, got 0", id="restarts"),
        pytest.param(lambda: AttackSpec(step_size=0), r"step_size must lie in \(0, 1\]", id="step"),
    ],
)
def test_bad_arguments_name_the_fix(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_module_without_epsilon_needs_one():
    callback = RobustEvaluation(num_samples=4)
    with pytest.raises(ValueError, match="NaturalModule has no `epsilon`.*RobustEvaluation\\(epsilon=...\\)"):
        quiet_trainer(callbacks=[callback]).validate(
            NaturalModule(tiny_cnn(), 3), DataLoader(tiny_dataset(4), batch_size=4), verbose=False
        )


DDP_SCRIPT = """
import sys
import torch
from torch.utils.data import DataLoader
sys.path.insert(0, {tests!r})
from conftest import banded_dataset, quiet_trainer, tiny_cnn
from freeadv_pl import AttackSpec, AutoAttackSpec, NaturalModule, RobustEvaluation

torch.manual_seed(0)
module = NaturalModule(tiny_cnn(), 3)
module.load_state_dict(torch.load({weights!r}))
# Random starts included: each batch has the same examples and seed whatever the number of processes.
suite = [AttackSpec(steps=0), AttackSpec(steps=5, step_size=0.03), AutoAttackSpec(version="apgd", steps=10)]
callback = RobustEvaluation(suite, epsilon=0.1, num_samples=51, batch_size=8)
trainer = quiet_trainer(accelerator="cpu", devices={devices}, strategy={strategy!r}, callbacks=[callback])
(result,) = trainer.validate(module, DataLoader(banded_dataset(77, seed=5), batch_size=16), verbose=False)
print(f"RESULT rank={{trainer.global_rank}} " + " ".join(f"{{key}}={{result['val/robust/' + key]:.10f}}"
      for key in ("natural", "pgd5", "apgd", "worst")) + f" examples={{callback.results['validate']['examples']}}",
      flush=True)
"""


def _run_script(tmp_path: Path, weights: Path, devices: int, strategy: str) -> list[str]:
    script = tmp_path / f"validate_{devices}.py"
    script.write_text(DDP_SCRIPT.format(tests=str(TESTS), weights=str(weights), devices=devices, strategy=strategy))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # Both processes write to one pipe, so one's line can land inside the other's (seen once in 16 runs at 2 torch
    # threads on a loaded machine): find each result by its own pattern, not by lines.
    return re.findall(r"RESULT rank=\d+ .*?examples=\d+", result.stdout)


def test_two_process_ddp_gives_the_one_process_number(tmp_path):
    weights = tmp_path / "weights.pt"
    torch.save(trained_tiny_module().state_dict(), weights)
    (single,) = _run_script(tmp_path, weights, devices=1, strategy="auto")
    ranks = _run_script(tmp_path, weights, devices=2, strategy="ddp")
    assert len(ranks) == 2
    expected = single.split(" ", 2)[2]
    assert "examples=51" in expected, "51 examples in 7 batches: 4 on one process, 3 on the other, nothing padded"
    for line in ranks:
        assert line.split(" ", 2)[2] == expected
