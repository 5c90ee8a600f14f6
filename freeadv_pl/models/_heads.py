"""The classification head of a backbone: found generically, and replaced by a fresh one for another number of
classes (what fine-tuning on another dataset needs)."""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from freeadv_pl._checks import check_int


def replace_head(backbone: nn.Module, num_classes: int) -> nn.Module:
    """Give ``backbone`` a freshly initialised classification head with ``num_classes`` outputs, in place.

    The head is found generically: a timm model's own ``reset_classifier``; otherwise the last ``nn.Linear``
    registered in the network, which is the head of torchvision's classifiers (``fc``, ``classifier[-1]``,
    ``heads.head``) and of this package's backbones. Auxiliary heads (GoogLeNet, Inception v3) are left as they are.

    Args:
        backbone: the network.
        num_classes: the new head's outputs.

    Returns:
        ``backbone``.

    Raises:
        ValueError: when ``num_classes`` < 1, or the network has no ``nn.Linear`` (SqueezeNet's head is a
            convolution): replace its head yourself.

    Example:
        >>> from freeadv_pl.models import SmallCNN
        >>> replace_head(SmallCNN(num_classes=10), 3).classifier[-1]
        Linear(in_features=128, out_features=3, bias=True)
    """
    check_int(num_classes, "num_classes", minimum=1)
    if callable(getattr(backbone, "reset_classifier", None)):
        backbone.reset_classifier(num_classes)
        return backbone
    name, head = head_of(backbone)
    if not isinstance(head, nn.Linear):
        raise ValueError(  # noqa: TRY004  (a network without the expected layer: a value error for users)
            f"{type(backbone).__name__} has no nn.Linear classification head to replace: give it {num_classes} "
            "outputs yourself (replace its last layer) and leave num_classes out."
        )
    fresh = nn.Linear(
        head.in_features, num_classes, bias=head.bias is not None, device=head.weight.device, dtype=head.weight.dtype
    )
    parent, _, attribute = name.rpartition(".")
    setattr(backbone.get_submodule(parent), attribute, fresh)
    return backbone


def head_of(backbone: nn.Module) -> tuple[str, nn.Module | None]:
    """The classification head and its name: timm's ``get_classifier()``, else the last ``nn.Linear``."""
    if callable(getattr(backbone, "get_classifier", None)):
        classifier = backbone.get_classifier()
        for name, module in backbone.named_modules():
            if module is classifier:
                return name, module
    linears = [(name, module) for name, module in backbone.named_modules() if isinstance(module, nn.Linear)]
    return linears[-1] if linears else ("", None)


def head_classes(backbone: nn.Module) -> int | None:
    """The number of outputs of ``backbone``'s head (:func:`head_of`), or None when it has none."""
    head = head_of(backbone)[1]
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, Tensor) else None


def set_classes(backbone: nn.Module, file_classes: int | None, num_classes: int) -> None:
    """Replace the head of ``backbone`` (whose weights have ``file_classes`` outputs) when ``num_classes`` differs, with
    a log line that says so."""
    if num_classes != file_classes:
        name = head_of(backbone)[0] or "head"
        replace_head(backbone, num_classes)
        rank_zero_info(
            f"{type(backbone).__name__}'s head {name} ({file_classes} outputs) is replaced by a freshly initialised "
            f"one with {num_classes}."
        )
