"""The GPU path: bf16 autocast, channels_last, NCCL DDP through Ray Train. Skipped without CUDA."""

from __future__ import annotations

import time

import pytest
import torch

from unet_ray import engine, gpu
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


def test_data_wait_meter_measures_gpu_idle_time_with_events():
    """Batches arriving 50 ms apart while the GPU has little queued: the GPU waits ~50 ms for each.
    GPU work that outlasts a 10 ms wait on the host: the GPU never waits."""
    device = torch.device("cuda")

    def batches(n: int, delay: float):
        for i in range(n):
            time.sleep(delay)
            yield i

    a = torch.randn(512, 512, device=device)
    meter = gpu.DataWaitMeter(batches(4, 0.05), device)
    for _ in meter:
        a = (a @ a).tanh()
    assert all(0.03 < w < 0.5 for w in meter.waits()[1:])

    big = torch.randn(8192, 8192, device=device)
    meter = gpu.DataWaitMeter(batches(4, 0.01), device)
    for _ in meter:
        for _ in range(20):  # hundreds of ms of queued work per step
            big = (big @ big).tanh()
    assert all(w < 0.005 for w in meter.waits()[1:])
    assert meter.summary(1.0)["data_wait_share"] < 0.05


def test_a_resumed_optimizer_keeps_its_step_counters_on_the_cpu(tmp_path):
    """A checkpoint loaded as the worker loads it (to the CPU) and restored into a model on the
    GPU: AdamW's moments move to the GPU, its step counters stay on the CPU as in a fresh run
    (on the GPU each step would read them back: two syncs per parameter per step)."""
    from unet_ray import checkpoint as ckpt_io
    from unet_ray import recipe, worker
    from unet_ray.config import OptimSection

    device = torch.device("cuda")
    model = UNet(2, depth=2, base_channels=4).to(device)
    optimizer = recipe.build_optimizer(model.parameters(), OptimSection())
    schedule = recipe.StepSchedule(optimizer, OptimSection(), steps_per_epoch=4)
    images = torch.randint(0, 255, (2, 32, 32, 3), dtype=torch.uint8)
    engine.train_one_epoch(model, [{"image": images, "mask": images[..., 0] > 127}], optimizer, device, scheduler=schedule)
    ckpt_io.save_state(tmp_path, {**worker.training_state(model, optimizer, schedule, None), "epoch": 1, "config": {}})

    resumed_model = UNet(2, depth=2, base_channels=4).to(device)
    resumed = recipe.build_optimizer(resumed_model.parameters(), OptimSection())
    resumed_schedule = recipe.StepSchedule(resumed, OptimSection(), steps_per_epoch=4)
    worker.restore_training_state(ckpt_io.load_state(tmp_path), resumed_model, resumed, resumed_schedule, None)
    for state in resumed.state.values():
        assert state["step"].device.type == "cpu"
        assert state["exp_avg"].device.type == "cuda" and state["exp_avg_sq"].device.type == "cuda"
