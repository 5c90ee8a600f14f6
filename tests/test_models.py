"""The backbones: parameter counts against the published ones, shapes, the Madry-style details, argument errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from torch import nn

from freeadv_pl import PreActResNet18, WideResNet
from freeadv_pl.models.wide_resnet import _Unit

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "build, expected, published",
    [
        # Zagoruyko & Komodakis (2016), Table 1: WRN-28-10, 36.5M.
        pytest.param(lambda: WideResNet(28, 10), 36_479_194, 36.5e6, id="wrn-28-10"),
        # No published count for these: the expected figures were reconstructed independently of this code.
        pytest.param(lambda: WideResNet(34, 10), 46_160_474, None, id="wrn-34-10"),
        # Madry et al.'s cifar10_challenge network, the paper's WRN-32-10: no 1×1 shortcut convolutions.
        pytest.param(lambda: WideResNet(32, 10, style="madry"), 45_901_914, None, id="wrn-32-10-madry"),
        pytest.param(lambda: WideResNet(32, 10, num_classes=100, style="madry"), 45_959_604, None, id="madry-c100"),
        # He et al. (2016) pre-activation ResNet-18 in the CIFAR layout, as in Wong et al. (2020): 11.17M.
        pytest.param(PreActResNet18, 11_172_170, 11.17e6, id="preact-resnet18"),
    ],
)
def test_parameter_counts(build, expected, published):
    count = parameters(build())
    assert count == expected
    if published is not None:
        assert count == pytest.approx(published, rel=0.005)


@pytest.mark.parametrize(
    "config, expected",
    [
        # torchvision's published counts (ResNet50_Weights.IMAGENET1K_V1.meta["num_params"], etc.).
        pytest.param("resnet50.yaml", 25_557_032, id="resnet50"),
        pytest.param("resnet101.yaml", 44_549_160, id="resnet101"),
        pytest.param("resnet152.yaml", 60_192_808, id="resnet152"),
    ],
)
def test_torchvision_resnets_built_from_the_imagenet_backbone_configs(config, expected):
    parser = ArgumentParser()
    parser.add_argument("--backbone", type=nn.Module)
    spec = yaml.safe_load((CONFIGS / "imagenet" / "common" / config).read_text())
    backbone = parser.instantiate_classes(parser.parse_object({"backbone": spec})).backbone
    assert parameters(backbone) == expected


@pytest.mark.parametrize(
    "model, image_size",
    [
        pytest.param(WideResNet(10, 2, num_classes=7), 32, id="wrn"),
        pytest.param(WideResNet(8, 2, num_classes=7, style="madry"), 32, id="wrn-madry"),
        pytest.param(WideResNet(10, 1, num_classes=7, in_channels=1), 28, id="wrn-grey-28"),
        pytest.param(PreActResNet18(num_classes=7), 40, id="preact"),
    ],
)
def test_logits_shape_and_gradients_on_any_image_size(model, image_size):
    x = torch.rand(3, model.stem.in_channels, image_size, image_size, requires_grad=True)
    logits = model(x)
    assert logits.shape == (3, 7)
    (gradient,) = torch.autograd.grad(logits.sum(), x)
    assert gradient.abs().sum() > 0


def test_madry_shortcut_is_average_pooling_and_zero_padded_channels():
    unit = _Unit(4, 8, stride=2, slope=0.1, projection=False, activate_shortcut=False, dropout=0.0)
    for conv in (unit.conv1, unit.conv2):
        nn.init.zeros_(conv.weight)
    x = torch.randn(2, 4, 6, 6)
    out = unit(x)
    pooled = torch.nn.functional.avg_pool2d(x, 2)
    assert out.shape == (2, 8, 3, 3)
    torch.testing.assert_close(out[:, 2:6], pooled)
    assert out[:, :2].abs().max() == 0 and out[:, 6:].abs().max() == 0
    assert unit.shortcut is None, "no projection convolution"


def test_madry_style_uses_leaky_relu():
    net = WideResNet(8, 1, style="madry").eval()
    unit = net.units[1]
    x = torch.full((1, unit.bn1.num_features, 4, 4), -1.0)
    assert unit._act(x).unique().item() == pytest.approx(-0.1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param(dict(depth=32), r"depth must be 6n \+ 4 .* 'zagoruyko' style, got 32: e.g. 28 or 34", id="depth"),
        pytest.param(dict(depth=28, style="madry"), r"6n \+ 2 .* got 28: e.g. 32", id="madry-depth"),
        pytest.param(dict(style="resnet"), "style must be one of 'zagoruyko', 'madry', got 'resnet'", id="style"),
        pytest.param(dict(dropout=1.0), r"dropout must lie in \[0, 1\), got 1.0", id="dropout"),
    ],
)
def test_wide_resnet_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WideResNet(**kwargs)
