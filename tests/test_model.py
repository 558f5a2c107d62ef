from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from unet_ray.config import MAX_DEPTH, MIN_BOTTLENECK
from unet_ray.model import DoubleConv, ResidualDoubleConv, UNet, build_model, out_channels, predict_classes


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
    with pytest.raises(ValueError, match="depth must be >= 1, got 0"):
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
    # every setting of the section reaches the model, not only the sizes
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert all(type(up.up) is torch.nn.ConvTranspose2d and type(up.conv) is DoubleConv for up in model.ups)
    other = build_model(SimpleNamespace(depth=3, base_channels=4, batch_norm=True, block="residual", upsample="bilinear"), 2)
    assert other.depth == 3 and other.head.out_channels == 1 and len(other.ups) == 3
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in other.modules())
    assert type(other.stem) is ResidualDoubleConv and all(type(d[1]) is ResidualDoubleConv for d in other.downs)
    assert all(isinstance(up.up[0], torch.nn.Upsample) and up.up[0].mode == "bilinear" for up in other.ups)


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


@pytest.mark.parametrize("num_classes", [2, 19])
def test_aux_heads_give_logits_at_each_coarser_decoder_level(num_classes):
    torch.manual_seed(0)
    model = UNet(num_classes=num_classes, depth=3, base_channels=4, aux_heads=True)
    logits, aux = model(torch.randn(2, 3, 32, 48), with_aux=True)
    k = out_channels(num_classes)
    assert logits.shape == (2, k, 32, 48)
    assert [a.shape for a in aux] == [(2, k, 8, 12), (2, k, 16, 24)]  # coarsest first; the finest level is `head`
    # the plain forward is the same logits, without the heads' work
    assert torch.equal(model.eval()(torch.ones(1, 3, 32, 48)), model(torch.ones(1, 3, 32, 48), with_aux=True)[0])
    with pytest.raises(ValueError, match="aux_heads=True"):
        UNet(depth=3, base_channels=4)(torch.randn(1, 3, 32, 32), with_aux=True)


def test_inference_weights_load_into_a_model_without_aux_heads():
    """What a deep-supervision run saves serves from a model built without the heads (evaluate,
    predict, export), with the same predictions."""
    from unet_ray.model import inference_weights

    torch.manual_seed(0)
    trained = UNet(num_classes=19, depth=2, base_channels=4, aux_heads=True).eval()
    saved = trained.state_dict()
    assert any(k.startswith("aux_heads.") for k in saved)
    served = UNet(num_classes=19, depth=2, base_channels=4).eval()
    served.load_state_dict(inference_weights(saved))  # strict: every other weight is there
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(served(x), trained(x))
