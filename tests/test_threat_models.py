"""Tests of freeadv_pl.threat_models: each method against the formula written out by hand (L∞ bitwise as the attacks
and trainers computed it before threat models existed), the L2 start inside the ball, the radius checks and the
wording."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import needs_cuda
from freeadv_pl.threat_models import L2, THREAT_MODELS, LInf, check_radius, format_pixels, threat_model

LINF, L2_ = threat_model("linf"), threat_model("l2")


@pytest.fixture
def tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images, perturbations and gradients shaped (B, C, H, W); one gradient is zero, one perturbation is zero and
    one lies far outside any small ball."""
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(6, 2, 4, 4, generator=generator).round(decimals=1)  # values at 0 and 1: the clamp matters
    delta = torch.randn(6, 2, 4, 4, generator=generator) * 0.2
    delta[1] = 0.0
    delta[2] *= 50
    grad = torch.randn(6, 2, 4, 4, generator=generator)
    grad[3] = 0.0
    return x, delta, grad


def _norms(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


# L∞: the formulas of the attacks and the Free-m update before threat models (git 3f52dfd^), compared bitwise.


def test_linf_random_start_is_the_uniform_draw_of_before():
    like = torch.empty(5, 1, 3, 3)
    ours = LINF.random_start(like, 0.1, torch.Generator().manual_seed(7))
    before = torch.empty_like(like).uniform_(-0.1, 0.1, generator=torch.Generator().manual_seed(7))
    assert torch.equal(ours, before)
    torch.manual_seed(7)
    ours = LINF.random_start(like, 0.1)
    torch.manual_seed(7)
    assert torch.equal(ours, torch.empty_like(like).uniform_(-0.1, 0.1)), "the global RNG when no generator"


@pytest.mark.parametrize("step", [0.01, torch.tensor(0.01)], ids=["float", "tensor"])
def test_linf_step_projection_and_images_are_those_of_before(step, tensors):
    x, delta, grad = tensors
    epsilon = 8 / 255
    assert torch.equal(LINF.ascend(delta, grad, step), delta + step * grad.sign())
    assert torch.equal(LINF.project(delta, epsilon), delta.clamp(-epsilon, epsilon))
    x_adv = x + delta
    before = torch.min(torch.max(x_adv, x - epsilon), x + epsilon).clamp(0.0, 1.0)
    assert torch.equal(LINF.project_images(x_adv, x, epsilon), before)
    # Free-m's δ update, clip(δ + ε_step · sign(g), −ε, ε) (the paper's Algorithm 2)
    free_before = (delta + epsilon * grad.sign()).clamp(-epsilon, epsilon)
    assert torch.equal(LINF.project(LINF.ascend(delta, grad, epsilon), epsilon), free_before)


# L2: δ ← δ + α·g / max(‖g‖₂, 1e-12) per example; δ · min(1, ε / ‖δ‖₂); then [0, 1].


@pytest.mark.parametrize("step", [0.3, torch.tensor(0.3)], ids=["float", "tensor"])
def test_l2_step_is_the_normalized_gradient_per_example(step, tensors):
    _, delta, grad = tensors
    by_hand = delta + step * grad / _norms(grad).clamp_min(1e-12)
    ours = L2_.ascend(delta, grad, step)
    torch.testing.assert_close(ours, by_hand, atol=1e-7, rtol=0)
    moved = _norms(ours - delta).flatten()
    assert torch.allclose(moved[[0, 1, 2, 4, 5]], torch.full((5,), 0.3)), "each example moves by α"
    assert torch.equal(ours[3], delta[3]), "a zero gradient moves nothing (no NaN)"


@pytest.mark.parametrize("epsilon", [0.5, torch.tensor(0.5)], ids=["float", "tensor"])
def test_l2_projection_scales_onto_the_ball(epsilon, tensors):
    x, delta, _ = tensors
    by_hand = delta * torch.clamp(0.5 / _norms(delta).clamp_min(1e-12), max=1.0)
    ours = L2_.project(delta, epsilon)
    torch.testing.assert_close(ours, by_hand, atol=1e-7, rtol=0)
    inside = _norms(delta).flatten() <= 0.5
    assert inside.any() and (~inside).any(), "the case has points inside and outside the ball"
    assert torch.equal(ours[inside], delta[inside]), "points inside the ball stay"
    assert torch.allclose(_norms(ours).flatten()[~inside], torch.tensor(0.5)), "points outside land on the sphere"
    assert torch.equal(ours[1], delta[1]), "δ = 0 stays 0 (no NaN)"
    images = L2_.project_images(x + delta, x, 0.5)
    torch.testing.assert_close(images, (x + by_hand).clamp(0.0, 1.0), atol=1e-7, rtol=0)


def test_l2_random_start_fills_the_ball_with_radii_spread_over_zero_to_epsilon():
    like = torch.empty(4000, 3, 4, 4)
    start = L2_.random_start(like, 0.5, torch.Generator().manual_seed(0))
    radii = _norms(start).flatten() / 0.5
    assert radii.max() <= 1 + 1e-6, "inside the ball"
    assert radii.min() < 0.01 and radii.max() > 0.99, "radii from 0 to ε, not only on the surface"
    histogram = torch.histc(radii, bins=10, min=0, max=1) / len(radii)  # radius uniform in [0, ε]
    assert torch.allclose(histogram, torch.full((10,), 0.1), atol=0.025), histogram
    directions = start.flatten(1) / _norms(start).flatten(1)
    assert directions.mean(dim=0).abs().max() < 0.05, "no preferred direction"


def test_l2_random_start_draws_a_normal_direction_then_a_uniform_radius():
    """The order torchattacks' PGDL2 draws in, so that the same seed gives the same start (tests/test_attacks.py)."""
    like = torch.empty(5, 1, 3, 3)
    generator = torch.Generator().manual_seed(4)
    direction = torch.empty(like.shape).normal_(generator=generator)
    radius = torch.empty(5, 1, 1, 1).uniform_(0.0, 1.0, generator=generator)
    by_hand = direction * (radius / _norms(direction) * 0.7)
    ours = L2_.random_start(like, 0.7, torch.Generator().manual_seed(4))
    torch.testing.assert_close(ours, by_hand, atol=1e-7, rtol=0)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_a_cpu_generator_gives_gpu_images_the_start_it_gives_cpu_images(norm):
    like = torch.empty(4, 1, 6, 6)
    on_cpu = threat_model(norm).random_start(like, 0.1, torch.Generator().manual_seed(3))
    on_gpu = threat_model(norm).random_start(like.cuda(), 0.1, torch.Generator().manual_seed(3))
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-6, rtol=0)


# Radii and step sizes


@pytest.mark.parametrize("value, expected", [(3.0, 3.0), ("8/255", 8 / 255), (0, 0.0), ("1/2", 0.5)])
def test_an_l2_radius_is_any_finite_number_at_least_zero(value, expected):
    assert L2_.radius(value) == pytest.approx(expected)


@pytest.mark.parametrize(
    "value, allow_zero, match",
    [
        pytest.param(-0.5, True, r"epsilon must be a finite number ≥ 0 \(an L2 radius.*got -0.5", id="negative"),
        pytest.param(math.inf, True, "epsilon must be a finite number ≥ 0.*got inf", id="inf"),
        pytest.param(math.nan, True, "epsilon must be a finite number ≥ 0.*got nan", id="nan"),
        pytest.param(0, False, "epsilon must be a finite number > 0.*got 0", id="zero-step"),
        pytest.param("8/256x", True, "epsilon must be a finite number ≥ 0, as a number or a fraction", id="typo"),
    ],
)
def test_a_bad_l2_radius_names_the_range(value, allow_zero, match):
    with pytest.raises(ValueError, match=match):
        L2_.radius(value, allow_zero=allow_zero)


def test_an_linf_radius_stays_in_zero_one():
    assert LINF.radius("8/255") == pytest.approx(8 / 255)
    with pytest.raises(ValueError, match=r"epsilon must lie in \[0, 1\] \(pixel units.*got 3.0"):
        LINF.radius(3.0)
    with pytest.raises(ValueError, match=r"step_size must lie in \(0, 1\]"):
        LINF.radius(0, "step_size", allow_zero=False)


def test_a_radius_before_the_norm_is_known_is_checked_against_some_threat_model():
    assert check_radius(3.0) == 3.0 and check_radius("8/255") == pytest.approx(8 / 255)
    assert check_radius(0.5, norm="l2") == 0.5
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\].*got 3.0"):
        check_radius(3.0, norm="linf")
    with pytest.raises(ValueError, match=r"epsilon must lie in \[0, 1\].*L∞, the default.*norm='l2'.*≥ 0.*got -1"):
        check_radius(-1)
    with pytest.raises(ValueError, match="got nan"):
        check_radius(math.nan)


def test_an_unknown_norm_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="norm must be one of 'linf', 'l2', got 'l1'"):
        threat_model("l1")
    with pytest.raises(TypeError, match="norm must be one of 'linf', 'l2', got 2"):
        threat_model(2)
    assert threat_model(L2_) is L2_ and isinstance(L2_, L2) and isinstance(LINF, LInf)
    assert list(THREAT_MODELS) == ["linf", "l2"], "the default first"


# Wording


def test_keys_titles_and_descriptions_name_the_norm_outside_linf():
    assert (LINF.key("pgd20"), L2_.key("pgd20")) == ("pgd20", "pgd20_l2")
    assert (LINF.title("PGD-20"), L2_.title("PGD-20")) == ("PGD-20", "PGD-20 (L2)")
    assert (LINF.describe(8 / 255), L2_.describe(0.5)) == ("L∞ ε = 8/255", "L2 ε = 0.5")
    assert (LINF.label(8 / 255), L2_.label(0.5)) == ("ε = 8/255", "L2 ε = 0.5")
    assert (LINF.torchattacks_norm, L2_.torchattacks_norm) == ("Linf", "L2")
    assert format_pixels(2 / 255) == "2/255" and format_pixels(0.125) == "0.125"
