from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from unet_ray.config import MAX_DEPTH, MIN_BOTTLENECK
from unet_ray.model import UNet, build_model, out_channels, predict_classes


@pytest.mark.parametrize("depth", range(1, MAX_DEPTH + 1))
@pytest.mark.parametrize("num_classes,channels", [(2, 1), (19, 19)])
def test_output_shape(depth, num_classes, channels):
    """Every depth the config allows, at the smallest image size it allows for that depth."""
    size = max(64, MIN_BOTTLENECK * 2**depth)
    torch.manual_seed(0)
    model = UNet(num_classes=num_classes, depth=depth, base_channels=4).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size))
    assert out.shape == (1, channels, size, size)
    assert torch.isfinite(out).all()


def test_non_square_input():
    model = UNet(num_classes=2, depth=2, base_channels=4).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 64)).shape == (1, 1, 32, 64)


@pytest.mark.parametrize("shape", [(1, 3, 60, 64), (1, 3, 64, 60), (1, 3, 48, 48)])
def test_input_not_multiple_of_2_pow_depth(shape):
    model = UNet(num_classes=2, depth=5, base_channels=4)
    with pytest.raises(ValueError, match="2\\*\\*depth=32"):
        model(torch.randn(*shape))


def test_depth_below_one_rejected():
    with pytest.raises(ValueError):
        UNet(depth=0)


def test_without_batch_norm():
    model = UNet(num_classes=19, depth=3, base_channels=4, batch_norm=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    out = model(torch.randn(1, 3, 64, 64))  # works with batch size 1 in train mode as well
    assert out.shape == (1, 19, 64, 64)
    with_bn = UNet(num_classes=19, depth=3, base_channels=4, batch_norm=True)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in with_bn.modules())


def test_build_model_from_section():
    cfg = SimpleNamespace(depth=2, base_channels=8, batch_norm=False, block="plain", upsample="transpose")
    model = build_model(cfg, 19)
    assert model.depth == 2
    assert model.head.out_channels == 19
    assert model.stem[0].out_channels == 8
    assert out_channels(2) == 1 and out_channels(19) == 19


def test_predict_classes_single_logit_thresholds_at_zero():
    logits = torch.tensor([-2.0, -1e-4, 0.0, 1e-4, 3.0]).reshape(1, 1, 1, 5)
    pred = predict_classes(logits)
    assert pred.shape == (1, 1, 5)
    assert pred.tolist() == [[[0, 0, 0, 1, 1]]]


def test_predict_classes_argmax():
    logits = torch.zeros(1, 3, 1, 3)
    logits[0, 2, 0, 0] = 5
    logits[0, 0, 0, 1] = 1
    logits[0, 1, 0, 2] = 0.5
    assert predict_classes(logits).tolist() == [[[2, 0, 1]]]
