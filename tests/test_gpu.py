"""The GPU path: bf16 autocast, channels_last, NCCL DDP through Ray Train. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from unet_ray import engine
from unet_ray.model import UNet

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_bf16_channels_last_training_step():
    device = torch.device("cuda")
    model = UNet(2, depth=3, base_channels=8).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    images = torch.randint(0, 255, (8, 64, 64, 3), dtype=torch.uint8)
    masks = (images[..., 0] > 127).to(torch.uint8)
    x = engine.to_model_input(images, device, channels_last=True)
    assert x.is_contiguous(memory_format=torch.channels_last)
    with engine.autocast(device, True):
        assert model(x).dtype == torch.bfloat16
    batches = [{"image": images, "mask": masks}] * 20
    first = engine.train_one_epoch(model, batches[:1], optimizer, device, mixed_precision=True, channels_last=True)
    last = engine.train_one_epoch(model, batches, optimizer, device, mixed_precision=True, channels_last=True)
    assert last["train_loss"] < first["train_loss"]
    assert (last["logits_dtype"], last["channels_last"]) == ("bfloat16", True)
    confusion = engine.evaluate(model, batches[:2], 2, device, mixed_precision=True, channels_last=True)["train_size"]
    assert int(confusion.mat.sum()) == 2 * 8 * 64 * 64


@pytest.mark.ray
def test_ray_train_on_gpus_with_nccl(tmp_path):
    import ray

    from unet_ray.config import TrainConfig
    from unet_ray.train import read_history, run_dir_of, run_training

    workers = min(2, torch.cuda.device_count())
    cfg = TrainConfig.from_dict(
        {
            "data": {"image_size": 64, "synth_train": 64, "synth_val": 16},
            "model": {"depth": 3, "base_channels": 8},
            "optim": {"epochs": 4, "batch_size": 8, "lr": 3e-3},
            "run": {"workers": workers, "gpu": True, "storage_path": str(tmp_path), "name": "gpu"},
        }
    ).validate()
    try:
        summary = run_training(cfg)
    finally:
        ray.shutdown()
    history = read_history(run_dir_of(cfg))
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert summary["metrics"]["val_iou"] > history[0]["val_iou"]
    # the GPU path: NCCL between the workers, bf16 autocast, channels_last
    assert {(r["dist_backend"], r["logits_dtype"], r["channels_last"]) for r in history} == {("nccl", "bfloat16", True)}
