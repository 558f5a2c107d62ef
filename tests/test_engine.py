from __future__ import annotations

import pytest
import torch

from unet_ray import engine
from unet_ray.metrics import ConfusionMatrix
from unet_ray.model import UNet


def _batch(n=4, size=32, seed=0):
    """Images whose bright pixels are class 1: a pattern a tiny UNet learns in a few steps."""
    g = torch.Generator().manual_seed(seed)
    coarse = (torch.rand(n, 1, size // 4, size // 4, generator=g) > 0.5).float()
    mask = torch.nn.functional.interpolate(coarse, scale_factor=4, mode="nearest")[:, 0].to(torch.uint8)
    noise = torch.randint(-20, 21, (n, size, size, 3), generator=g)
    image = (mask[..., None].int() * 160 + 40 + noise).clamp(0, 255).to(torch.uint8)
    return {"image": image, "mask": mask}


def test_to_model_input():
    images = torch.tensor([[[[0, 255, 127]]]], dtype=torch.uint8)  # (1, 1, 1, 3)
    x = engine.to_model_input(images, torch.device("cpu"))
    assert x.shape == (1, 3, 1, 1) and x.dtype == torch.float32
    assert torch.allclose(x.flatten(), torch.tensor([-1.0, 1.0, 127 / 127.5 - 1]))
    assert engine.to_model_input(torch.zeros(2, 4, 4, 3, dtype=torch.uint8), torch.device("cpu"), channels_last=True).is_contiguous(
        memory_format=torch.channels_last
    )


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    model = UNet(num_classes=2, depth=2, base_channels=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = _batch()
    device = torch.device("cpu")
    first = engine.train_one_epoch(model, [batch], optimizer, device)
    assert first["train_images"] == 4
    assert first["train_seconds"] >= 0
    later = engine.train_one_epoch(model, [batch] * 30, optimizer, device)
    assert later["train_images"] == 120
    last = engine.train_one_epoch(model, [batch], optimizer, device)
    assert last["train_loss"] < 0.5 * first["train_loss"], (first, last)
    # and the model now segments the batch
    cm = engine.evaluate(model, [batch], 2, device)["train_size"]
    assert cm.compute()["iou_per_class"][1] > 0.8


def _many_class_batch(n=2, size=16, classes=5, seed=0):
    """Blocks of `classes` classes, each with its own colour; a few pixels ignored (255)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, classes, (n, 1, size // 4, size // 4), generator=g).float()
    mask = torch.nn.functional.interpolate(coarse, scale_factor=4, mode="nearest")[:, 0].to(torch.uint8)
    colours = torch.randint(0, 256, (classes, 3), generator=g)
    noise = torch.randint(-10, 11, (n, size, size, 3), generator=g)
    image = (colours[mask.long()] + noise).clamp(0, 255).to(torch.uint8)
    mask[:, 0, :3] = 255
    return {"image": image, "mask": mask}


def _loss_by_hand(logits, mask, dice_weight):
    """Cross-entropy over the labelled pixels plus dice_weight x (1 - mean over classes of soft
    Dice (2 sum(p y) + 1) / (sum(p) + sum(y) + 1), labelled pixels only), class by class."""
    target, valid = mask.long(), mask != 255
    log_p = logits.float().log_softmax(1)
    picked = log_p.gather(1, target.masked_fill(~valid, 0)[:, None])[:, 0]
    cross_entropy = -picked[valid].mean()
    p = log_p.exp()
    dice = [
        (2 * p[:, c][valid & (target == c)].sum() + 1) / (p[:, c][valid].sum() + (valid & (target == c)).sum() + 1)
        for c in range(logits.shape[1])
    ]
    return cross_entropy + dice_weight * (1 - torch.stack(dice).mean())


def test_training_with_dice_and_many_classes_runs():
    """Training on 5 classes with the soft-Dice term: the loss reported is cross-entropy plus the
    weighted Dice term as computed by hand, every parameter gets a gradient, and a few steps on one
    fixed batch lower the loss, Dice term included."""
    import copy

    device = torch.device("cpu")
    torch.manual_seed(0)
    model = UNet(num_classes=5, depth=1, base_channels=4)
    batch = _many_class_batch()
    x = engine.to_model_input(batch["image"], device)

    # one step: the loss it reports is the one of the model before the step (train mode)
    before = copy.deepcopy(model)
    with torch.no_grad():
        logits = before.train()(x)
    assert logits.shape == (2, 5, 16, 16)
    with_dice = _loss_by_hand(logits, batch["mask"], 0.5)
    without_dice = _loss_by_hand(logits, batch["mask"], 0.0)
    assert with_dice - without_dice > 0.1  # the Dice term is there and weighs
    for weight, expected in ((0.5, with_dice), (0.0, without_dice)):
        trained = copy.deepcopy(before)
        optimizer = torch.optim.SGD(trained.parameters(), lr=1e-2)
        out = engine.train_one_epoch(trained, [batch], optimizer, device, dice_weight=weight)
        assert out["train_loss"] == pytest.approx(float(expected), rel=1e-5), weight
    # two steps with Dice on the model itself: its last step's gradients reached every parameter
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    out = engine.train_one_epoch(model, [batch, batch], optimizer, device, dice_weight=0.5)
    assert out["train_images"] == 4
    assert torch.isfinite(torch.tensor(out["train_loss"])) and out["train_loss"] > 0
    assert (out["logits_dtype"], out["channels_last"]) == ("float32", False)  # how the step ran on CPU
    no_gradient = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_gradient == []

    # a few steps on the same batch: the loss, and its Dice term, go down
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    engine.train_one_epoch(model, [batch] * 40, optimizer, device, dice_weight=0.5)
    with torch.no_grad():
        logits_after = model.train()(x)
    after_dice = _loss_by_hand(logits_after, batch["mask"], 0.5) - _loss_by_hand(logits_after, batch["mask"], 0.0)
    last = engine.train_one_epoch(model, [batch], optimizer, device, dice_weight=0.5)
    assert last["train_loss"] < 0.5 * float(with_dice), (float(with_dice), last["train_loss"])
    assert after_dice < 0.75 * (with_dice - without_dice), (float(with_dice - without_dice), float(after_dice))

    out = engine.train_one_epoch(model, [batch], optimizer, device, channels_last=True)
    assert (out["logits_dtype"], out["channels_last"]) == ("float32", True)


def test_empty_epoch():
    model = UNet(num_classes=2, depth=1, base_channels=4)
    optimizer = torch.optim.Adam(model.parameters())
    out = engine.train_one_epoch(model, [], optimizer, torch.device("cpu"))
    assert out["train_loss"] == 0.0 and out["train_images"] == 0


def test_evaluate_counts_non_ignored_pixels():
    torch.manual_seed(0)
    model = UNet(num_classes=2, depth=2, base_channels=4)
    a, b = _batch(n=3, seed=1), _batch(n=2, seed=2)
    a["mask"][:, :5] = 255
    b["mask"][0] = 255
    cm = engine.evaluate(model, [a, b], 2, torch.device("cpu"))["train_size"]
    assert isinstance(cm, ConfusionMatrix)
    expected = int((a["mask"] != 255).sum() + (b["mask"] != 255).sum())
    assert int(cm.mat.sum()) == expected
    assert not model.training  # evaluate leaves the model in eval mode


def test_evaluate_multiclass_matches_manual_confusion():
    torch.manual_seed(0)
    model = UNet(num_classes=19, depth=2, base_channels=4).eval()
    batch = _batch(n=2)
    batch["mask"] = (batch["mask"] * 7).to(torch.uint8)
    cm = engine.evaluate(model, [batch], 19, torch.device("cpu"))["train_size"]
    with torch.no_grad():
        pred = model(engine.to_model_input(batch["image"], torch.device("cpu"))).argmax(1)
    manual = ConfusionMatrix(19)
    manual.update(batch["mask"], pred)
    assert torch.equal(cm.mat, manual.mat)


def test_first_step_seconds_counts_the_wait_for_the_first_batch():
    import time

    def slow_start(batches, wait):
        time.sleep(wait)  # a data pipeline that is not ready when the epoch begins
        yield from batches

    model = UNet(num_classes=2, depth=1, base_channels=4)
    optimizer = torch.optim.Adam(model.parameters())
    out = engine.train_one_epoch(model, slow_start([_batch(n=2, size=16)] * 3, 0.3), optimizer, torch.device("cpu"))
    assert 0.3 <= out["first_step_seconds"] <= out["train_seconds"]


def test_start_in_background_fetches_the_first_batch_early_and_keeps_order():
    import threading
    import time

    import pytest

    from unet_ray.worker import start_in_background

    fetched_by = []

    def batches():
        fetched_by.append(threading.current_thread().name)
        yield from range(4)

    started = start_in_background(batches())
    deadline = time.monotonic() + 5
    while not fetched_by and time.monotonic() < deadline:  # fetched before anyone asks
        time.sleep(0.01)
    assert fetched_by == ["first-batch"]
    assert list(started) == [0, 1, 2, 3]
    assert list(start_in_background(iter([]))) == []

    def broken():
        raise ValueError("bad block")
        yield  # pragma: no cover

    with pytest.raises(ValueError, match="bad block"):
        list(start_in_background(broken()))


def test_class_weights_reach_the_loss():
    """The same model, batch and step: the loss reported is the class-weighted one."""
    from unet_ray.losses import segmentation_loss

    batch = _batch(n=2, size=16)
    device = torch.device("cpu")
    weights = torch.tensor([1.0, 4.0, 9.0])
    torch.manual_seed(0)
    model = UNet(num_classes=3, depth=1, base_channels=4, batch_norm=False)
    x, y = engine.to_model_input(batch["image"], device), batch["mask"].long()
    with torch.no_grad():
        weighted, plain = segmentation_loss(model(x), y, weights=weights), segmentation_loss(model(x), y)
    assert abs(weighted.item() - plain.item()) > 1e-3
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the step changes nothing
    out = engine.train_one_epoch(model, [batch], optimizer, device, class_weights=weights)
    assert out["train_loss"] == pytest.approx(weighted.item(), rel=1e-5)


def test_deep_supervision_adds_the_aux_loss_and_trains_the_aux_heads():
    """One step with lr 0 reports main loss + weight x aux loss; a real step moves the aux heads."""
    from unet_ray.losses import deep_supervision_loss, segmentation_loss

    batch = _batch(n=2, size=16)
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = UNet(num_classes=3, depth=2, base_channels=4, batch_norm=False, aux_heads=True)
    x, y = engine.to_model_input(batch["image"], device), batch["mask"].long()
    with torch.no_grad():
        logits, aux = model(x, with_aux=True)
        main, extra = segmentation_loss(logits, y), deep_supervision_loss(aux, y)
    out = engine.train_one_epoch(model, [batch], torch.optim.SGD(model.parameters(), lr=0.0), device, deep_supervision=0.4)
    assert out["train_loss"] == pytest.approx(main.item() + 0.4 * extra.item(), rel=1e-5)
    before = [p.detach().clone() for p in model.aux_heads.parameters()]
    engine.train_one_epoch(model, [batch], torch.optim.SGD(model.parameters(), lr=0.1), device, deep_supervision=0.4)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.aux_heads.parameters()))
