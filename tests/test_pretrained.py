"""Backbones by name and from weights files (freeadv_pl/models/pretrained.py): torchvision and timm weights with their
statistics, our checkpoints and exports, the head, and every error. No test downloads: published weights are served
from local files by monkeypatching the download, which another test makes fail."""

from __future__ import annotations

import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from conftest import quiet_trainer, tiny_dataset
from jsonargparse import ArgumentParser
from torch import nn
from torch.utils.data import DataLoader

from freeadv_pl import FreeAdversarialModule, InputNormalization, NaturalModule, SmallCNN, WideResNet
from freeadv_pl.export import export_classifier
from freeadv_pl.models import (
    PretrainedBackbone,
    TorchvisionBackbone,
    load_backbone_weights,
    pretrained_backbone,
    replace_head,
    timm_backbone,
    torchvision_backbone,
)

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # torchvision's transforms()


def same_weights(net: nn.Module, state: dict[str, torch.Tensor], skip: str = "") -> bool:
    own = net.state_dict()
    return all(torch.equal(own[key], value) for key, value in state.items() if not (skip and key.startswith(skip)))


@pytest.fixture
def resnet18_file(tmp_path):
    """A randomly initialised torchvision ResNet-18's state_dict (1,000 classes), as torchvision's files hold it."""
    torch.manual_seed(1)
    state = torchvision.models.resnet18().state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture
def served_torchvision(monkeypatch, resnet18_file):
    """torchvision's download, answered with the local ResNet-18 file; records the URLs asked for."""
    asked = []

    def load(url, *args, **kwargs):
        asked.append(url)
        return torch.load(resnet18_file[0], weights_only=True)

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", load)
    return asked


# torchvision


def test_torchvision_without_weights_is_the_bare_network_with_its_classes():
    net = torchvision_backbone("resnet18", num_classes=10)
    assert isinstance(net, torchvision.models.ResNet) and net.fc.out_features == 10


@pytest.mark.parametrize("weights", ["DEFAULT", "IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1"])
def test_torchvision_weights_bring_their_statistics_and_a_fresh_head(weights, served_torchvision, resnet18_file):
    net = torchvision_backbone("resnet18", weights=weights, num_classes=10)
    assert served_torchvision == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url]
    assert isinstance(net, InputNormalization)
    torch.testing.assert_close(net.mean.flatten().tolist(), IMAGENET_MEAN)
    torch.testing.assert_close(net.std.flatten().tolist(), IMAGENET_STD)
    assert net.backbone.fc.out_features == 10
    assert same_weights(net.backbone, resnet18_file[1], skip="fc.")


def test_torchvision_keeps_the_head_when_the_classes_match(served_torchvision, resnet18_file):
    net = torchvision_backbone("resnet18", weights="DEFAULT")
    assert same_weights(net.backbone, resnet18_file[1]), "the 1,000-class head too"


def test_given_statistics_replace_the_weights(served_torchvision):
    net = torchvision_backbone("resnet18", weights="DEFAULT", mean=[0.5] * 3, std=[0.25] * 3)
    assert net.mean.flatten().tolist() == [0.5] * 3


def test_a_torchvision_weights_file_loads_without_statistics_unless_given(resnet18_file, lightning_log):
    path, state = resnet18_file
    net = torchvision_backbone("resnet18", weights=str(path), num_classes=7)
    assert isinstance(net, torchvision.models.ResNet) and net.fc.out_features == 7
    assert same_weights(net, state, skip="fc.")
    assert "carries no normalization statistics: the model normalizes with the data's" in lightning_log.text
    wrapped = torchvision_backbone("resnet18", weights=str(path), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert isinstance(wrapped, InputNormalization) and same_weights(wrapped.backbone, state)


def test_another_torchvision_family_mobilenet_v3(tmp_path):
    torch.manual_seed(2)
    state = torchvision.models.mobilenet_v3_small().state_dict()
    torch.save(state, tmp_path / "mobilenet.pth")
    net = torchvision_backbone("mobilenet_v3_small", weights=str(tmp_path / "mobilenet.pth"), num_classes=5)
    assert net.classifier[-1].out_features == 5 and net.classifier[-1].in_features == 1024
    assert same_weights(net, state, skip="classifier.3.")
    assert net.eval()(torch.rand(2, 3, 64, 64)).shape == (2, 5)


def test_a_failed_torchvision_download_names_the_cache_and_the_local_file_option(monkeypatch):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match=r"could not download .*Name or service not known.*") as error:
        torchvision_backbone("resnet18", weights="DEFAULT")
    message = str(error.value)
    assert str(torch.hub.get_dir()) in message and "checkpoints/resnet18-f37072fd.pth" in message
    assert 'weights="/path/to/resnet18-f37072fd.pth"' in message


@pytest.mark.parametrize(
    "name, weights, match",
    [
        pytest.param(
            "resnet51", None, r"unknown model name 'resnet51'\. Close names: resnet50.*list_models\(\)", id="name"
        ),
        pytest.param(
            "resnet18",
            "IMAGENET1K_V9",
            r"no weights 'IMAGENET1K_V9' for resnet18: they are DEFAULT, IMAGENET1K_V1",
            id="weights",
        ),
        pytest.param("resnet18", "ResNet50_Weights.IMAGENET1K_V1", r"no weights .* for resnet18", id="other-model"),
    ],
)
def test_unknown_torchvision_names_are_explained(name, weights, match):
    with pytest.raises(ValueError, match=match):
        torchvision_backbone(name, weights=weights)


# timm


@pytest.fixture
def served_timm(monkeypatch):
    """timm's downloads (Hugging Face hub and URL), answered with a fixed ResNet-18 state_dict."""
    import timm.models._builder

    torch.manual_seed(3)
    state = timm.create_model("resnet18").state_dict()
    for name in ("load_state_dict_from_hf", "load_state_dict_from_url"):
        monkeypatch.setattr(timm.models._builder, name, lambda *args, **kwargs: dict(state))
    return state


@pytest.mark.parametrize("weights", ["DEFAULT", "a1_in1k", "resnet18.a1_in1k"])
def test_timm_weights_bring_their_statistics_and_a_fresh_head(weights, served_timm):
    net = timm_backbone("resnet18", weights=weights, num_classes=4)
    assert isinstance(net, InputNormalization)
    torch.testing.assert_close(net.mean.flatten().tolist(), IMAGENET_MEAN)
    assert net.backbone.get_classifier().out_features == 4
    assert same_weights(net.backbone, served_timm, skip="fc.")


def test_a_timm_weights_file_and_no_weights(tmp_path):
    import timm

    torch.manual_seed(4)
    state = timm.create_model("resnet18").state_dict()
    torch.save(state, tmp_path / "timm_resnet18.pth")
    net = timm_backbone("resnet18", weights=str(tmp_path / "timm_resnet18.pth"), num_classes=3)
    assert net.fc.out_features == 3 and same_weights(net, state, skip="fc.")
    assert timm_backbone("resnet18", num_classes=6).fc.out_features == 6


def test_a_failed_timm_download_names_the_cache_and_the_local_file_option(monkeypatch):
    import timm.models._builder

    def offline(*args, **kwargs):
        raise FileNotFoundError("cannot find the requested files in the local cache")  # huggingface_hub's is one

    for name in ("load_state_dict_from_hf", "load_state_dict_from_url"):
        monkeypatch.setattr(timm.models._builder, name, offline)
    with pytest.raises(RuntimeError, match=r"timm could not download the weights resnet18\.a1_in1k") as error:
        timm_backbone("resnet18", weights="DEFAULT")
    assert "HF_HUB_CACHE" in str(error.value) and 'weights="/path/to/file.pth"' in str(error.value)


@pytest.mark.parametrize(
    "name, weights, match",
    [
        pytest.param("resnet19", None, r"Close names: .*timm\.list_models\(\)", id="name"),
        pytest.param("resnet18", "in99k", r"timm has no weights 'resnet18\.in99k': those of resnet18 are", id="tag"),
    ],
)
def test_unknown_timm_names_are_explained(name, weights, match):
    with pytest.raises(ValueError, match=match):
        timm_backbone(name, weights=weights)


def test_without_timm_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ImportError, match=r'pip install "freeadv_pl\[timm\]"'):
        timm_backbone("resnet18")


# Our checkpoints and files


def trained_checkpoint(tmp_path, mean=(0.3,), std=(0.4,)):
    """A NaturalModule on SmallCNN(image_size=8) trained for a few steps, saved as a Lightning checkpoint."""
    torch.manual_seed(5)
    data = tiny_dataset(16, num_classes=10)
    images = torch.nn.functional.interpolate(data.tensors[0], size=8)
    loader = DataLoader(torch.utils.data.TensorDataset(images, data.tensors[1]), batch_size=8)
    module = NaturalModule(SmallCNN(image_size=8), num_classes=10, mean=list(mean), std=list(std))
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(module, train_dataloaders=loader)
    trainer.save_checkpoint(tmp_path / "natural.ckpt")
    return tmp_path / "natural.ckpt", module


def test_a_training_checkpoint_gives_its_backbone_and_statistics(tmp_path):
    path, module = trained_checkpoint(tmp_path)
    net = pretrained_backbone(SmallCNN(image_size=8), path, num_classes=3)
    assert isinstance(net, InputNormalization)
    assert net.mean.flatten().tolist() == pytest.approx([0.3]) and net.std.flatten().tolist() == pytest.approx([0.4])
    assert same_weights(net.backbone, module.model.backbone.state_dict(), skip="classifier.3.")
    assert net.backbone.classifier[3].out_features == 3


def test_load_backbone_weights_returns_the_statistics_and_keeps_the_files_classes(tmp_path):
    path, module = trained_checkpoint(tmp_path, mean=(0.2,), std=(0.5,))
    net = SmallCNN(image_size=8, num_classes=4)  # the head takes the file's 10 classes
    mean, std = load_backbone_weights(net, path)
    assert mean == pytest.approx([0.2]) and std == pytest.approx([0.5])
    assert same_weights(net, module.model.backbone.state_dict()) and net.classifier[3].out_features == 10


def test_nested_normalization_wrappers_compose_their_statistics(tmp_path):
    torch.manual_seed(6)
    inner = InputNormalization(SmallCNN(image_size=8), mean=[0.2], std=[0.5])
    outer = InputNormalization(inner, mean=[0.1], std=[2.0])
    torch.save(
        {"state_dict": {f"model.{key}": value for key, value in outer.state_dict().items()}}, tmp_path / "n.ckpt"
    )
    net = pretrained_backbone(SmallCNN(image_size=8), tmp_path / "n.ckpt")
    images = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(net(images), outer(images))


def test_an_exported_state_dict_takes_the_statistics_of_its_json(tmp_path):
    model = InputNormalization(SmallCNN(), mean=[0.286], std=[0.353])
    files = export_classifier(model, tmp_path / "model.pt2", (1, 28, 28))
    net = pretrained_backbone(SmallCNN(), files["state_dict"])
    assert net.mean.flatten().tolist() == pytest.approx([0.286])
    assert same_weights(net.backbone, model.backbone.state_dict())


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda state: {"state_dict": state}, id="state_dict-key"),
        pytest.param(lambda state: {"model": state}, id="model-key"),
        pytest.param(lambda state: {f"module.{key}": value for key, value in state.items()}, id="ddp-prefix"),
    ],
)
def test_common_state_dict_containers(wrap, tmp_path):
    state = SmallCNN().state_dict()
    torch.save(wrap(state), tmp_path / "w.pt")
    net = SmallCNN()
    assert load_backbone_weights(net, tmp_path / "w.pt") is None and same_weights(net, state)


def test_a_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    state = SmallCNN().state_dict()
    save_file(state, tmp_path / "w.safetensors")
    net = SmallCNN()
    load_backbone_weights(net, tmp_path / "w.safetensors")
    assert same_weights(net, state)


def test_weights_none_keeps_the_backbone_and_sets_its_classes():
    backbone = SmallCNN(num_classes=10)
    assert pretrained_backbone(backbone, None, num_classes=10) is backbone
    assert pretrained_backbone(SmallCNN(), None, num_classes=4).classifier[3].out_features == 4


@pytest.mark.parametrize(
    "saved, built, match",
    [
        pytest.param(
            lambda: SmallCNN(width=16),
            lambda: SmallCNN(width=8),
            r"shapes: features\.0\.weight \(file \(16, 1, 3, 3\), backbone \(8, 1, 3, 3\)\).*Build the backbone as the "
            r"run that wrote them did.*model\.init_args\.backbone in its config\.yaml",
            id="shapes",
        ),
        pytest.param(
            lambda: WideResNet(depth=10, widen_factor=1),
            SmallCNN,
            r"missing in the file: features\.0\.weight.*; not in the backbone: stem\.weight, .* and \d+ more",
            id="keys",
        ),
    ],
)
def test_weights_that_do_not_fit_are_listed_with_the_fix(saved, built, match, tmp_path):
    torch.save(saved().state_dict(), tmp_path / "w.pt")
    with pytest.raises(ValueError, match=match):
        pretrained_backbone(built(), tmp_path / "w.pt")


@pytest.mark.parametrize(
    "content, match",
    [
        pytest.param(
            lambda: SmallCNN(), r"cannot be read as weights with torch\.load.*torch\.save\(net\.state_dict", id="module"
        ),
        pytest.param(lambda: [torch.zeros(2)], r"holds no state_dict \(a dict of tensors\), got list", id="list"),
    ],
)
def test_files_that_hold_no_state_dict_are_explained(content, match, tmp_path):
    torch.save(content(), tmp_path / "w.pt")
    with pytest.raises(ValueError, match=match):
        load_backbone_weights(SmallCNN(), tmp_path / "w.pt")


def test_a_missing_file_names_the_command_line_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*--model\.init_args\.backbone\.init_args\.weights"):
        pretrained_backbone(SmallCNN(), tmp_path / "nowhere.ckpt")


# The head


@pytest.mark.parametrize(
    "build, head",
    [
        pytest.param(torchvision.models.resnet18, "fc", id="resnet18"),
        pytest.param(torchvision.models.mobilenet_v3_small, "classifier.3", id="mobilenet_v3_small"),
        pytest.param(torchvision.models.efficientnet_b0, "classifier.1", id="efficientnet_b0"),
        pytest.param(SmallCNN, "classifier.3", id="small-cnn"),
        pytest.param(lambda: WideResNet(depth=10, widen_factor=1), "fc", id="wide-resnet"),
    ],
)
def test_the_head_is_found_and_replaced(build, head):
    net = build()
    before = {key: value.clone() for key, value in net.state_dict().items() if not key.startswith(head + ".")}
    replace_head(net, 3)
    assert net.get_submodule(head).out_features == 3
    assert same_weights(net, before), "only the head changes"


def test_a_timm_head_is_reset_by_timm():
    import timm

    assert replace_head(timm.create_model("mobilenetv3_small_050"), 3).get_classifier().out_features == 3


def test_a_network_without_a_linear_head_is_explained():
    with pytest.raises(ValueError, match=r"SqueezeNet has no nn\.Linear classification head to replace"):
        replace_head(torchvision.models.squeezenet1_0(), 3)


# Grayscale data, YAML, the training module


def test_a_three_channel_backbone_with_statistics_takes_grey_images(served_torchvision):
    # (x - mean) / std broadcasts a 1-channel batch against 3-channel statistics: the grey channel is repeated,
    # each copy normalized with its channel's statistics (docs/finetuning.md, "Grey images").
    net = torchvision_backbone("resnet18", weights="DEFAULT", num_classes=10).eval()
    grey = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(net(grey), net(grey.expand(-1, 3, -1, -1)))


def test_the_factories_are_classes_for_a_yaml_class_path(tmp_path):
    torch.save(SmallCNN().state_dict(), tmp_path / "w.pt")
    parser = ArgumentParser()
    parser.add_argument("--backbone", type=nn.Module)
    specs = f"""
    - class_path: freeadv_pl.models.TorchvisionBackbone
      init_args: {{name: resnet18, num_classes: 7, model_kwargs: {{zero_init_residual: true}}}}
    - class_path: freeadv_pl.models.PretrainedBackbone
      init_args:
        backbone: {{class_path: freeadv_pl.SmallCNN}}
        weights: {tmp_path / "w.pt"}
        mean: [0.5]
        std: [0.5]
    """
    built = [parser.instantiate(parser.parse_object({"backbone": spec})).backbone for spec in yaml.safe_load(specs)]
    assert isinstance(built[0], torchvision.models.ResNet) and built[0].fc.out_features == 7
    assert isinstance(built[1], InputNormalization) and isinstance(built[1].backbone, SmallCNN)
    assert issubclass(TorchvisionBackbone, nn.Module) and issubclass(PretrainedBackbone, nn.Module)


def test_a_training_module_keeps_the_weights_statistics(tmp_path):
    # The contract of ClassifierModule (base.py): a backbone that is an InputNormalization with statistics is the
    # model itself, and the data's statistics are not applied a second time.
    path, _ = trained_checkpoint(tmp_path, mean=(0.3,), std=(0.4,))
    backbone = pretrained_backbone(SmallCNN(image_size=8), path)
    module = FreeAdversarialModule(backbone, num_classes=10, mean=[0.9], std=[0.1])
    assert module.model is backbone and module.model.mean.flatten().tolist() == pytest.approx([0.3])


@pytest.mark.parametrize(
    "backbone, name",
    [
        pytest.param("freeadv_pl.models.TorchvisionBackbone", "resnet18", id="torchvision"),
        pytest.param("freeadv_pl.models.TimmBackbone", "resnet10t", id="timm"),
    ],
)
def test_a_named_backbone_with_a_weights_file_trains_through_a_config(backbone, name, tmp_path, monkeypatch):
    import timm
    from dataset_files import write_cifar

    from freeadv_pl.cli import build_cli

    build = torchvision.models.get_model if "Torchvision" in backbone else timm.create_model
    file = build(name).state_dict()  # ImageNet's 1,000 classes: the head is replaced for CIFAR-10's 10
    torch.save(file, tmp_path / "weights.pth")
    write_cifar(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    configs = Path(__file__).resolve().parent.parent / "configs" / "cifar10"
    args = ["--config", str(configs / "free_m2.yaml"), "--config", str(configs / "quick.yaml")]
    args += ["--trainer.default_root_dir", str(tmp_path / "run"), "--model.init_args.backbone", backbone]
    args += [f"--model.init_args.backbone.init_args.name={name}", "--model.init_args.backbone.init_args.num_classes=10"]
    args += ["--model.init_args.backbone.init_args.weights", str(tmp_path / "weights.pth")]
    built = build_cli(args, run=False).model.model.backbone
    assert torch.equal(
        built.state_dict()["conv1.weight" if "conv1.weight" in file else "conv1.0.weight"],
        file["conv1.weight" if "conv1.weight" in file else "conv1.0.weight"],
    ), "the file's weights"
    assert build_cli(["fit", *args]).trainer.global_step == 2 * 2, "2 batches of Free-2"
