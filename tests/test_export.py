"""Export: the program runs in a Python without freeadv_pl and gives the module's logits; the command line exports a
`freeadv_pl fit` checkpoint; a backbone torch.export cannot trace fails with the fix and leaves nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import quiet_trainer, tiny_cnn, tiny_loader
from dataset_files import write_fashion_mnist
from torch import nn

from freeadv_pl import NaturalModule, SmallCNN
from freeadv_pl.cli import build_cli, main

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "fashion_mnist"

WITHOUT_FREEADV_PL = """
import sys
sys.modules["freeadv_pl"] = None  # any import of freeadv_pl now fails
import torch
try:
    import freeadv_pl
except ImportError:
    pass
else:
    raise SystemExit("freeadv_pl was importable")
program = torch.export.load(sys.argv[1]).module()
x = torch.load(sys.argv[2])
torch.save({"all": program(x), "one": program(x[:1])}, sys.argv[3])
"""


def _run_without_freeadv_pl(program: Path, x: torch.Tensor, tmp_path: Path) -> dict[str, torch.Tensor]:
    torch.save(x, tmp_path / "x.pt")
    script = tmp_path / "load.py"
    script.write_text(WITHOUT_FREEADV_PL)
    result = subprocess.run(
        [sys.executable, str(script), str(program), str(tmp_path / "x.pt"), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


def test_the_program_runs_without_freeadv_pl_and_gives_the_modules_logits(tmp_path):
    module = NaturalModule(SmallCNN(), 10, mean=[0.3], std=[0.35])
    quiet_trainer(max_steps=2).fit(module, train_dataloaders=_fashion_like_loader())
    assert module.input_shape == (1, 28, 28), "recorded from the first training batch"
    files = module.export(tmp_path / "model.pt2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.backbone.pt", "model.json", "model.pt2"]
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    out = _run_without_freeadv_pl(files["program"], x, tmp_path)
    with torch.no_grad():
        expected = module.eval()(x)
    torch.testing.assert_close(out["all"], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["one"], expected[:1], atol=1e-5, rtol=0)
    # The state_dict rebuilds the backbone; model.json gives the normalization it expects.
    info = json.loads(files["info"].read_text())
    backbone = SmallCNN()
    backbone.load_state_dict(torch.load(files["state_dict"], weights_only=True))
    mean, std = torch.tensor(info["mean"]).view(1, -1, 1, 1), torch.tensor(info["std"]).view(1, -1, 1, 1)
    torch.testing.assert_close(backbone.eval()((x - mean) / std), expected, atol=1e-5, rtol=0)


def _fashion_like_loader():
    from torch.utils.data import DataLoader, TensorDataset

    generator = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.rand(8, 1, 28, 28, generator=generator), torch.arange(8)), batch_size=4)


def test_the_command_line_exports_a_fit_checkpoint(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    write_fashion_mnist(data, n_train=120, n_test=20)
    monkeypatch.chdir(tmp_path)
    cli = build_cli(
        ["fit", "--config", str(CONFIGS / "natural.yaml"), "--config", str(CONFIGS / "quick.yaml")]
        + ["--data.init_args.data_dir", str(data), "--trainer.default_root_dir", str(tmp_path / "run")]
    )
    checkpoint = tmp_path / "run" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    main(["export", "--ckpt_path", str(checkpoint), "--output", str(tmp_path / "out" / "model.pt2")])
    assert "program: " in capsys.readouterr().out
    module = cli.model.eval()  # the weights last.ckpt holds
    x = torch.rand(3, 1, 28, 28)
    out = _run_without_freeadv_pl(tmp_path / "out" / "model.pt2", x, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(out["all"], module(x), atol=1e-5, rtol=0)


class _DataDependent(nn.Module):
    """A backbone whose Python branch reads a tensor's value: torch.export cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.net(x)
        return -self.net(x)


def test_an_untraceable_backbone_names_the_fix_and_leaves_nothing(tmp_path):
    module = NaturalModule(_DataDependent(), 3)
    quiet_trainer(max_steps=1).fit(module, train_dataloaders=tiny_loader())
    with pytest.raises(ValueError, match="cannot trace the backbone _DataDependent.*torch.where.*Nothing was written"):
        module.export(tmp_path / "model.pt2")
    assert not list(tmp_path.iterdir())


def test_bad_export_requests_name_the_fix(tmp_path):
    module = NaturalModule(tiny_cnn(), 3)
    with pytest.raises(ValueError, match="input shape is unknown: pass input_shape"):
        module.export(tmp_path / "model.pt2")
    with pytest.raises(ValueError, match="must end in .pt2"):
        module.export(tmp_path / "model.pt", input_shape=(1, 6, 6))
    trainer = quiet_trainer(max_steps=1, enable_checkpointing=False)
    trainer.fit(module, train_dataloaders=tiny_loader())
    trainer.save_checkpoint(tmp_path / "python.ckpt")
    with pytest.raises(FileNotFoundError, match="no config to rebuild the model.*export --config.*module.export"):
        main(["export", "--ckpt_path", str(tmp_path / "python.ckpt"), "--output", str(tmp_path / "model.pt2")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["python.ckpt"]
