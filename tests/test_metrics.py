from __future__ import annotations

import math

import pytest
import torch

from unet_ray.metrics import ConfusionMatrix, headline, metrics_from_confusion


def test_two_class_hand_computed():
    target = torch.tensor([[1, 1, 1, 0, 0, 0, 255, 255]])
    pred = torch.tensor([[1, 1, 0, 0, 0, 1, 1, 0]])
    cm = ConfusionMatrix(2)
    cm.update(target, pred)
    # rows truth, columns prediction; the two 255 pixels are not counted
    assert cm.mat.tolist() == [[2, 1], [1, 2]]
    m = cm.compute()
    assert m["iou_per_class"] == pytest.approx([2 / 4, 2 / 4])
    assert m["dice_per_class"] == pytest.approx([4 / 6, 4 / 6])
    assert m["miou"] == pytest.approx(0.5)
    assert m["pixel_accuracy"] == pytest.approx(4 / 6)


def test_three_class_hand_computed():
    target = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 255])
    pred = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 0, 2])
    cm = ConfusionMatrix(3)
    cm.update(target, pred)
    assert cm.mat.tolist() == [[3, 1, 0], [0, 2, 1], [1, 0, 1]]
    m = cm.compute()
    # class 0: tp 3, fp 1, fn 1 -> 3/5; class 1: tp 2, fp 1, fn 1 -> 2/4; class 2: tp 1, fp 1, fn 1 -> 1/3
    assert m["iou_per_class"] == pytest.approx([3 / 5, 2 / 4, 1 / 3])
    assert m["dice_per_class"] == pytest.approx([6 / 8, 4 / 6, 2 / 4])
    assert m["miou"] == pytest.approx((3 / 5 + 2 / 4 + 1 / 3) / 3)
    assert m["pixel_accuracy"] == pytest.approx(6 / 9)


def test_ignored_pixels_not_counted_whatever_predicted():
    target = torch.full((4, 4), 255)
    target[0, 0] = 1
    cm = ConfusionMatrix(2)
    cm.update(target, torch.ones(4, 4, dtype=torch.long))
    assert int(cm.mat.sum()) == 1
    assert cm.mat.tolist() == [[0, 0], [0, 1]]


def test_update_accumulates():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([1, 0]), torch.tensor([1, 1]))
    cm.update(torch.tensor([1, 0]), torch.tensor([1, 1]))
    assert cm.mat.tolist() == [[0, 2], [0, 2]]


def test_halves_sum_to_whole():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (2, 32, 32), generator=g)
    target[torch.rand(2, 32, 32, generator=g) < 0.1] = 255
    pred = torch.randint(0, 5, (2, 32, 32), generator=g)
    whole = ConfusionMatrix(5)
    whole.update(target, pred)
    a, b = ConfusionMatrix(5), ConfusionMatrix(5)
    a.update(target[:, :16], pred[:, :16])
    b.update(target[:, 16:], pred[:, 16:])
    summed = ConfusionMatrix(5)
    summed.mat = a.mat + b.mat
    assert torch.equal(summed.mat, whole.mat)
    assert summed.compute() == whole.compute()  # all 5 classes present: no NaN to compare
    assert int(whole.mat.sum()) == int((target != 255).sum())


def test_all_reduce_without_process_group_is_a_no_op():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([1, 0, 1]), torch.tensor([1, 0, 0]))
    before = cm.mat.clone()
    cm.all_reduce()
    assert torch.equal(cm.mat, before)


def test_absent_class_is_nan_and_miou_ignores_it():
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 0, 1, 0])
    cm = ConfusionMatrix(3)
    cm.update(target, pred)
    m = cm.compute()
    iou = m["iou_per_class"]
    assert iou[0] == pytest.approx(2 / 3)
    assert iou[1] == pytest.approx(1 / 2)
    assert math.isnan(iou[2]) and math.isnan(m["dice_per_class"][2])
    assert m["miou"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_class_present_only_in_prediction_has_iou_zero():
    m = metrics_from_confusion(torch.tensor([[1, 1], [0, 0]]))
    assert m["iou_per_class"][1] == 0.0
    assert m["miou"] == pytest.approx(0.25)


def test_empty_matrix_is_nan():
    m = ConfusionMatrix(2).compute()
    assert math.isnan(m["miou"]) and math.isnan(m["pixel_accuracy"])


def test_headline_binary_is_road_iou():
    m = {"iou_per_class": [0.9, 0.4], "dice_per_class": [0.95, 0.6], "miou": 0.65}
    assert headline(m, 2) == {"val_iou": 0.4, "val_dice": 0.6}


def test_headline_multiclass_is_miou():
    dice = [0.5] * 18 + [float("nan")]
    m = {"iou_per_class": [0.3] * 19, "dice_per_class": dice, "miou": 0.3}
    h = headline(m, 19)
    assert h["val_iou"] == 0.3
    assert h["val_dice"] == pytest.approx(0.5)
