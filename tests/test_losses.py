from __future__ import annotations

import math

import pytest
import torch

from unet_ray.losses import class_weights, segmentation_loss, soft_dice_loss


def _target(n=2, h=8, w=8, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, k, (n, h, w), generator=g)
    t[:, :2] = 255  # the top two rows are ignored
    return t


@pytest.mark.parametrize("dice_weight", [0.0, 0.5])
def test_bce_ignores_255(dice_weight):
    t = _target(k=2)
    logits = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    changed = logits.clone()
    changed[:, :, :2] = 100.0 * torch.randn(2, 1, 2, 8)
    a = segmentation_loss(logits, t, dice_weight)
    b = segmentation_loss(changed, t, dice_weight)
    assert torch.allclose(a, b)
    # while changing a valid pixel does change it
    changed[:, :, 5] += 3.0
    assert not torch.allclose(a, segmentation_loss(changed, t, dice_weight))


@pytest.mark.parametrize("dice_weight", [0.0, 0.5])
def test_ce_ignores_255(dice_weight):
    t = _target(k=5)
    logits = torch.randn(2, 5, 8, 8, generator=torch.Generator().manual_seed(1))
    changed = logits.clone()
    changed[:, :, :2] = 100.0 * torch.randn(2, 5, 2, 8)
    a = segmentation_loss(logits, t, dice_weight)
    b = segmentation_loss(changed, t, dice_weight)
    assert torch.allclose(a, b)
    changed[:, :, 5] += torch.randn(2, 5, 8)
    assert not torch.allclose(a, segmentation_loss(changed, t, dice_weight))


def test_bce_value_matches_torch_over_valid_pixels():
    t = _target(k=2)
    logits = torch.randn(2, 1, 8, 8)
    valid = t != 255
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0][valid], t[valid].float())
    assert torch.allclose(segmentation_loss(logits, t), expected, atol=1e-6)


def _confident(target, k, sign=1.0):
    """Logits that predict `target` (sign=1) or something else (sign=-1) with high confidence."""
    safe = target.masked_fill(target == 255, 0)
    if k == 1:
        return (sign * 20.0 * (2 * safe.float() - 1)).unsqueeze(1)
    one_hot = torch.nn.functional.one_hot(safe, k).permute(0, 3, 1, 2).float()
    return sign * 20.0 * (2 * one_hot - 1)


@pytest.mark.parametrize("k,channels", [(2, 1), (4, 4)])
def test_perfect_logits_give_near_zero_loss(k, channels):
    t = _target(k=k)
    logits = _confident(t, channels)
    assert segmentation_loss(logits, t).item() < 1e-4
    assert segmentation_loss(logits, t, dice_weight=1.0).item() < 1e-3


@pytest.mark.parametrize("k,channels", [(2, 1), (4, 4)])
def test_dice_term_increases_loss_of_wrong_prediction(k, channels):
    t = _target(k=k)
    wrong = _confident(t, channels, sign=-1.0)
    plain = segmentation_loss(wrong, t)
    with_dice = segmentation_loss(wrong, t, dice_weight=1.0)
    assert plain.item() > 1.0
    assert with_dice.item() > plain.item() + 0.5


@pytest.mark.parametrize("channels,k", [(1, 2), (3, 3)])
@pytest.mark.parametrize("dice_weight", [0.0, 1.0])
def test_gradients_flow(channels, k, dice_weight):
    t = _target(k=k)
    logits = torch.randn(2, channels, 8, 8, requires_grad=True)
    segmentation_loss(logits, t, dice_weight).backward()
    g = logits.grad
    assert g is not None and torch.isfinite(g).all()
    assert g[:, :, 2:].abs().sum() > 0  # valid pixels get a gradient
    assert g[:, :, :2].abs().sum() == 0  # ignored pixels none, through the Dice term neither


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dice_weight", [0.0, 1.0])
def test_all_ignored_batch_is_finite(channels, dice_weight):
    # e.g. a crop that holds only void pixels: the loss must not turn the epoch's mean into NaN
    t = torch.full((1, 4, 4), 255)
    logits = torch.randn(1, channels, 4, 4, requires_grad=True)
    loss = segmentation_loss(logits, t, dice_weight)
    assert torch.isfinite(loss)
    assert loss.item() == 0.0  # nothing to learn from: it adds nothing to the epoch's loss
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad == 0).all()  # and does not move the weights


@pytest.mark.parametrize("channels,k", [(1, 2), (4, 4)])
def test_dice_term_is_the_soft_dice_of_the_probabilities_by_hand(channels, k):
    """The Dice term adds dice_weight x soft Dice of (1 - sigmoid, sigmoid) for one logit, of the
    softmax for several (computed only when the term is on)."""
    torch.manual_seed(0)
    t = _target(k=k)
    logits = torch.randn(2, channels, 8, 8)
    probs = torch.cat([1 - logits.sigmoid(), logits.sigmoid()], 1) if channels == 1 else logits.softmax(1)
    extra = segmentation_loss(logits, t, dice_weight=0.5) - segmentation_loss(logits, t)
    assert extra.item() == pytest.approx(0.5 * soft_dice_loss(probs, t, t != 255).item(), abs=1e-6)


def test_ce_value_matches_torch_mean_over_valid_pixels():
    t = _target(k=5)
    logits = torch.randn(2, 5, 8, 8)
    expected = torch.nn.functional.cross_entropy(logits, t, ignore_index=255)
    assert torch.allclose(segmentation_loss(logits, t), expected, atol=1e-6)


def test_soft_dice_bounds():
    t = torch.tensor([[[0, 1], [1, 0]]])
    valid = torch.ones_like(t, dtype=torch.bool)
    perfect = torch.nn.functional.one_hot(t, 2).permute(0, 3, 1, 2).float()
    assert soft_dice_loss(perfect, t, valid).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_dice_loss(1 - perfect, t, valid).item() > 0.6


def test_inverse_log_class_weights_follow_enet():
    pixels = [600, 300, 100, 0]
    weights = class_weights(pixels, "inverse_log")
    shares = torch.tensor([0.6, 0.3, 0.1, 0.0])
    assert torch.allclose(weights, 1 / torch.log(1.02 + shares))
    assert weights[0] < weights[1] < weights[2] < weights[3] == pytest.approx(1 / math.log(1.02))
    assert class_weights(pixels, "none") is None
    with pytest.raises(ValueError, match="unknown class weighting 'median'"):
        class_weights(pixels, "median")


def test_weighted_ce_is_torchs_weighted_mean_over_valid_pixels():
    target = _target(k=4)
    logits = torch.randn(2, 4, 8, 8)
    weights = torch.tensor([1.0, 2.0, 5.0, 0.5])
    expected = torch.nn.functional.cross_entropy(logits, target, weight=weights, ignore_index=255)
    assert segmentation_loss(logits, target, weights=weights).item() == pytest.approx(expected.item(), rel=1e-5)
    assert segmentation_loss(logits, target, weights=torch.ones(4)).item() == pytest.approx(
        segmentation_loss(logits, target).item(), rel=1e-6
    )


def test_weighted_bce_weights_road_and_rest_pixels():
    target = _target(k=2)
    logits = torch.randn(2, 1, 8, 8)
    valid = target != 255
    per_pixel = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[:, 0], target.clamp(max=1).float(), reduction="none"
    )
    w = torch.where(target == 1, 3.0, 1.0) * valid
    expected = (per_pixel * w).sum() / w.sum()
    got = segmentation_loss(logits, target, weights=torch.tensor([1.0, 3.0]))
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_all_ignored_batch_gives_zero_weighted_loss():
    target = torch.full((1, 4, 4), 255)
    loss = segmentation_loss(torch.randn(1, 3, 4, 4), target, weights=torch.ones(3))
    assert loss.item() == 0.0


@pytest.mark.parametrize("channels", [1, 4])
def test_deep_supervision_loss_is_the_mean_over_levels_against_the_subsampled_mask(channels):
    from unet_ray.losses import deep_supervision_loss

    g = torch.Generator().manual_seed(0)
    k = 2 if channels == 1 else channels
    target = torch.randint(0, k, (2, 16, 16), generator=g)
    target[0, :4] = 255  # ignored rows stay ignored at every level
    aux = [torch.randn(2, channels, 4, 4, generator=g), torch.randn(2, channels, 8, 8, generator=g)]
    weights = torch.tensor([1.0, 3.0, 2.0, 5.0][:k])
    by_hand = (
        segmentation_loss(aux[0], target[:, 2::4, 2::4], weights=weights)  # the pixel nearest each 4x4 block's centre
        + segmentation_loss(aux[1], target[:, 1::2, 1::2], weights=weights)
    ) / 2
    assert deep_supervision_loss(aux, target, weights) == pytest.approx(by_hand.item(), rel=1e-6)
    assert target[:, 2::4, 2::4][0, 0].eq(255).all()  # premise: the coarse masks hold ignored pixels too
