"""The training recipe: optimizers, per-step schedules with warmup, EMA, exact resume, and the
evaluation options (native-size IoU, flip test-time augmentation). No Ray."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from unet_ray import checkpoint, engine, recipe, worker
from unet_ray.data import steps_per_epoch
from unet_ray.model import UNet

LR = 0.1


def optim_cfg(**overrides):
    values = dict(
        optimizer="adamw", lr=LR, weight_decay=0.0, momentum=0.9, schedule="cosine", warmup_epochs=0.0, epochs=2, ema_decay=0.0
    )
    values.update(overrides)
    return SimpleNamespace(**values)


def lrs(cfg, steps_per_epoch: int, extra_steps: int = 0) -> list[float]:
    """The learning rate the optimizer uses at each step 0, 1, ..., total + extra_steps."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = recipe.build_optimizer([param], cfg)
    schedule = recipe.StepSchedule(optimizer, cfg, steps_per_epoch)
    seen = []
    for _ in range(schedule.total_steps + extra_steps + 1):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return seen


def test_cosine_with_warmup_learning_rates_at_given_steps():
    # 2 epochs of 10 steps, half an epoch (5 steps) of linear warmup from lr/100, then cosine to 0
    seen = lrs(optim_cfg(schedule="cosine", warmup_epochs=0.5), steps_per_epoch=10)
    assert seen[0] == pytest.approx(LR * recipe.WARMUP_START_FACTOR)
    for step in range(5):  # linear ramp
        assert seen[step] == pytest.approx(LR * (0.01 + 0.99 * step / 5))
    assert seen[5] == pytest.approx(LR)  # peak right after warmup
    for step in range(5, 21):
        assert seen[step] == pytest.approx(LR * (1 + math.cos(math.pi * (step - 5) / 15)) / 2, abs=1e-9)
    assert seen[20] == pytest.approx(0.0, abs=1e-12)


def test_poly_schedule_and_no_climb_after_the_planned_steps():
    seen = lrs(optim_cfg(schedule="poly"), steps_per_epoch=10, extra_steps=5)
    for step in (0, 7, 13, 19):
        assert seen[step] == pytest.approx(LR * (1 - step / 20) ** recipe.POLY_POWER)
    # a cosine would climb again past its end and OneCycleLR would raise: the schedule stops instead
    assert seen[20:] == [seen[20]] * 6 and seen[20] == pytest.approx(0.0, abs=1e-12)
    assert lrs(optim_cfg(schedule="cosine"), 10, extra_steps=5)[20:] == pytest.approx([0.0] * 6, abs=1e-12)


def test_constant_with_warmup_and_onecycle():
    seen = lrs(optim_cfg(schedule="constant", warmup_epochs=1), steps_per_epoch=4)
    assert seen[0] == pytest.approx(LR / 100) and seen[4:] == pytest.approx([LR] * 5)
    cycle = lrs(optim_cfg(schedule="onecycle"), steps_per_epoch=50, extra_steps=3)
    peak = max(range(len(cycle)), key=cycle.__getitem__)
    assert cycle[peak] == pytest.approx(LR) and peak == round(0.3 * 100) - 1  # pct_start 0.3, counted from 0
    assert cycle[0] == pytest.approx(LR / 25) and cycle[-1] < LR / 1000


def test_optimizers():
    params = [torch.nn.Parameter(torch.zeros(2))]
    adam = recipe.build_optimizer(params, optim_cfg(optimizer="adam", weight_decay=0.01))
    assert type(adam) is torch.optim.Adam
    assert (adam.param_groups[0]["lr"], adam.param_groups[0]["weight_decay"]) == (LR, 0.01)
    adamw = recipe.build_optimizer(params, optim_cfg(optimizer="adamw", weight_decay=0.05))
    assert type(adamw) is torch.optim.AdamW
    assert (adamw.param_groups[0]["lr"], adamw.param_groups[0]["weight_decay"]) == (LR, 0.05)
    sgd = recipe.build_optimizer(params, optim_cfg(optimizer="sgd", weight_decay=1e-4))
    assert type(sgd) is torch.optim.SGD and sgd.param_groups[0]["nesterov"] and sgd.param_groups[0]["momentum"] == 0.9
    assert (sgd.param_groups[0]["lr"], sgd.param_groups[0]["weight_decay"]) == (LR, 1e-4)
    plain = recipe.build_optimizer(params, optim_cfg(optimizer="sgd", momentum=0.0))  # Nesterov needs momentum
    assert plain.param_groups[0]["momentum"] == 0.0 and not plain.param_groups[0]["nesterov"]
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        recipe.build_optimizer(params, optim_cfg(optimizer="lamb"))


def test_steps_per_epoch_matches_an_equal_split():
    # 101 rows over 2 workers: 50 each (one row dropped); batches of 16 -> 4 steps (16+16+16+2)
    assert steps_per_epoch(101, 2, 16) == 4
    assert steps_per_epoch(96, 2, 16) == 3
    assert steps_per_epoch(101, 2, 16, drop_last=True) == 3  # compiled models drop the partial batch


def _batches(n_batches: int, seed: int = 0, size: int = 16):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        image = torch.randint(0, 256, (4, size, size, 3), dtype=torch.uint8, generator=g)
        mask = (image[..., 0] > 128).to(torch.uint8)  # learnable: road where red is bright
        out.append({"image": image, "mask": mask})
    return out


def _setup(ema_decay: float, steps_per_epoch: int, epochs: int = 3):
    torch.manual_seed(0)
    model = UNet(2, depth=1, base_channels=4)
    cfg = optim_cfg(schedule="cosine", warmup_epochs=0.5, epochs=epochs, ema_decay=ema_decay)
    optimizer = recipe.build_optimizer(model.parameters(), cfg)
    schedule = recipe.StepSchedule(optimizer, cfg, steps_per_epoch)
    return model, optimizer, schedule, recipe.build_ema(model, ema_decay)


def test_ema_follows_the_weights_by_its_formula_and_is_what_a_checkpoint_serves():
    model, optimizer, schedule, ema = _setup(ema_decay=0.9, steps_per_epoch=2)
    first_update = None
    for i, batch in enumerate(_batches(2)):
        engine.train_one_epoch(model, [batch], optimizer, torch.device("cpu"), scheduler=schedule, ema=ema)
        weights = [p.detach().clone() for p in model.parameters()]
        if i == 0:
            first_update = weights  # the first update copies the weights
    expected = [0.9 * a + 0.1 * b for a, b in zip(first_update, weights)]
    for got, want, raw in zip(ema.module.parameters(), expected, model.parameters()):
        assert torch.allclose(got, want, atol=1e-6)
    assert any(not torch.equal(got, raw) for got, raw in zip(ema.module.parameters(), model.parameters()))
    # BatchNorm statistics are averaged too (use_buffers), so the EMA model validates on its own
    ema_bn = next(m for m in ema.module.modules() if isinstance(m, torch.nn.BatchNorm2d))
    raw_bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not torch.equal(ema_bn.running_mean, raw_bn.running_mean)

    state = worker.training_state(model, optimizer, schedule, ema)
    for name, value in ema.module.state_dict().items():  # "model" = the EMA weights: validated, served
        assert torch.equal(state["model"][name], value)
    for name, value in model.state_dict().items():  # the raw weights: what training continues from
        assert torch.equal(state["train_model"][name], value)
    assert state["ema_updates"] == 2


@pytest.mark.parametrize("ema_decay", [0.0, 0.8])
def test_resume_restores_optimizer_schedule_and_ema_exactly(tmp_path, ema_decay):
    """3 epochs of 2 steps straight through, against 1 epoch, a checkpoint written and read back
    into fresh objects, then 2 more: the same learning rates and the same weights, bit for bit."""
    torch.set_num_threads(1)
    epochs = [_batches(2, seed=e) for e in range(3)]
    device = torch.device("cpu")

    model, optimizer, schedule, ema = _setup(ema_decay, steps_per_epoch=2)
    straight_lrs = []
    for batches in epochs:
        engine.train_one_epoch(model, batches, optimizer, device, scheduler=schedule, ema=ema)
        straight_lrs.append(schedule.get_last_lr())
    straight = (ema.module if ema else model).state_dict()

    model, optimizer, schedule, ema = _setup(ema_decay, steps_per_epoch=2)
    engine.train_one_epoch(model, epochs[0], optimizer, device, scheduler=schedule, ema=ema)
    checkpoint.save_state(tmp_path, {**worker.training_state(model, optimizer, schedule, ema), "epoch": 1, "config": {}})
    state = checkpoint.load_state(tmp_path)

    model, optimizer, schedule, ema = _setup(ema_decay, steps_per_epoch=2)
    worker.restore_training_state(state, model, optimizer, schedule, ema)
    assert schedule.get_last_lr() == straight_lrs[0] and schedule.steps_done == 2
    resumed_lrs = [schedule.get_last_lr()]
    for batches in epochs[1:]:
        engine.train_one_epoch(model, batches, optimizer, device, scheduler=schedule, ema=ema)
        resumed_lrs.append(schedule.get_last_lr())
    assert resumed_lrs == straight_lrs
    for name, value in (ema.module if ema else model).state_dict().items():
        assert torch.equal(value, straight[name]), name


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are fixed: +1 in the left half, -1 in the right half (4x4)."""

    def forward(self, x):
        logits = torch.ones(x.shape[0], 1, 4, 4)
        logits[..., 2:] = -1
        return logits


def test_a_resumed_run_keeps_the_class_weights_it_trained_with():
    computed = [0.5, 2.0]  # what the driver computed from this run's training pixels
    assert worker.loss_class_weights(None, computed).tolist() == computed  # a new run
    assert worker.loss_class_weights(None, None) is None
    weighted = {"config": {"optim": {"class_weights": "inverse_log"}}}
    assert worker.loss_class_weights({**weighted, "class_weights": [1.0, 3.0]}, computed).tolist() == [1.0, 3.0]
    assert worker.loss_class_weights({**weighted, "class_weights": None}, computed) is None  # trained unweighted
    # a checkpoint from before optim.class_weights existed trained unweighted, whatever today's default
    assert worker.loss_class_weights({"config": {"optim": {"lr": 1e-3}}}, computed) is None
    # one with the option but without the saved weights (written before they were saved) used the driver's
    assert worker.loss_class_weights({"config": {"optim": {"class_weights": "auto"}}}, computed).tolist() == computed


def test_native_size_iou_against_a_hand_computation():
    # Upsampled bilinearly (half-pixel centres) to 8x8, the logit of output column j is read at
    # input x = (j + 0.5) / 2 - 0.5: columns 0-3 lie nearer the +1 columns (column 3: 0.75*1 +
    # 0.25*(-1) = 0.5 > 0), 4-7 nearer the -1 ones. So road is predicted in columns 0-3 of 8.
    # The native mask has road in columns 0-2: 24 true positives, 8 false positives, IoU 0.75;
    # at the training size (road in columns 0-1 of 4) the prediction is exact: IoU 1.
    small = torch.zeros(1, 4, 4, dtype=torch.uint8)
    small[..., :2] = 1
    native = torch.zeros(1, 8, 8, dtype=torch.uint8)
    native[..., :3] = 1
    batch = {"image": torch.zeros(1, 4, 4, 3, dtype=torch.uint8), "mask": small, "mask_native": native}
    confusion = engine.evaluate(FixedLogits(), [batch], 2, torch.device("cpu"), native=True)
    assert confusion["train_size"].compute()["iou_per_class"][1] == 1.0
    assert confusion["native"].mat.tolist() == [[32, 8], [0, 24]]
    assert confusion["native"].compute()["iou_per_class"][1] == pytest.approx(24 / 32)


def test_flip_tta_equals_averaging_two_passes():
    torch.manual_seed(0)
    model = UNet(19, depth=2, base_channels=4).eval()
    torch.nn.init.zeros_(model.head.bias)  # else the random biases alone decide every pixel's class
    batch = _batches(1, size=32)[0]
    batch["mask"] = (batch["mask"] * 5).to(torch.uint8)
    x = engine.to_model_input(batch["image"], torch.device("cpu"))
    with torch.no_grad():
        by_hand = (model(x) + model(x.flip(-1)).flip(-1)) / 2
        assert torch.allclose(engine.predict_logits(model, x, flip_tta=True), by_hand, atol=1e-6)
        assert not torch.equal(by_hand.argmax(1), model(x).argmax(1))  # TTA changes some pixels here
    expected = engine.ConfusionMatrix(19)
    expected.update(batch["mask"], by_hand.argmax(1))
    tta = engine.evaluate(model, [batch], 19, torch.device("cpu"), flip_tta=True)["train_size"]
    assert torch.equal(tta.mat, expected.mat)


def test_precision_choice(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\nflags : fpu avx2 avx512f avx512_bf16\n")
    assert recipe.cpu_has_native_bf16(cpuinfo)
    cpuinfo.write_text("processor : 0\nflags : fpu avx2 avx512f\n")
    assert not recipe.cpu_has_native_bf16(cpuinfo)
    assert not recipe.cpu_has_native_bf16(tmp_path / "missing")
    cpu = torch.device("cpu")
    assert recipe.use_bf16("bf16", cpu) and not recipe.use_bf16("fp32", torch.device("cuda"))
    assert recipe.use_bf16("auto", torch.device("cuda"))


def test_bf16_autocast_on_cpu_trains_in_bf16():
    torch.manual_seed(0)
    model = UNet(2, depth=1, base_channels=4).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = engine.train_one_epoch(model, _batches(2), optimizer, torch.device("cpu"), mixed_precision=True, channels_last=True)
    assert (out["logits_dtype"], out["channels_last"]) == ("bfloat16", True)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32


def test_a_run_resumed_with_more_epochs_follows_the_longer_plan():
    param = torch.nn.Parameter(torch.zeros(1))
    short = optim_cfg(schedule="cosine", warmup_epochs=0.5, epochs=2)
    optimizer = recipe.build_optimizer([param], short)
    schedule = recipe.StepSchedule(optimizer, short, steps_per_epoch=10)
    for _ in range(20):
        optimizer.step()
        schedule.step()
    saved = schedule.state_dict()
    assert schedule.get_last_lr() == pytest.approx(0.0, abs=1e-12)

    longer = optim_cfg(schedule="cosine", warmup_epochs=0.5, epochs=4)
    resumed = recipe.StepSchedule(optimizer, longer, steps_per_epoch=10)
    resumed.load_state_dict(saved)
    assert resumed.steps_done == 20
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lrs(longer, 10)[20])  # mid-way down, not 0


@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "poly"])
def test_a_time_budget_replan_gives_the_schedule_planned_for_that_many_epochs(schedule):
    """After epoch 1 a time-budget run re-plans its schedule for the epochs that fit: from there on
    its learning rates are those of a run configured with that many epochs, ending at the end value."""
    cfg = optim_cfg(schedule=schedule, warmup_epochs=0.5, epochs=10)  # at most 10 epochs
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = recipe.build_optimizer([param], cfg)
    schedule_ = recipe.StepSchedule(optimizer, cfg, steps_per_epoch=10)
    for _ in range(10):  # epoch 1
        optimizer.step()
        schedule_.step()
    schedule_.replan(4)
    seen = [optimizer.param_groups[0]["lr"]]
    for _ in range(30 + 3):  # epochs 2-4, and 3 steps more: no climb past the end
        optimizer.step()
        schedule_.step()
        seen.append(optimizer.param_groups[0]["lr"])
    planned = lrs(optim_cfg(schedule=schedule, warmup_epochs=0.5, epochs=4), steps_per_epoch=10, extra_steps=3)
    assert seen == pytest.approx(planned[10:], rel=1e-9, abs=1e-15)
    assert schedule_.total_steps == 40 and seen[30] == pytest.approx(planned[-1])
    # a resumed run builds its schedule with the saved plan and continues exactly
    resumed = recipe.StepSchedule(optimizer, cfg, steps_per_epoch=10, epochs=4)
    resumed.load_state_dict({"steps_done": 20})
    assert optimizer.param_groups[0]["lr"] == pytest.approx(planned[20])


def test_plan_epochs_fits_the_budget_between_the_epochs_done_and_the_cap():
    # 100 s left at 30 s an epoch: 3 more after the one done
    assert recipe.plan_epochs(seconds_left=100, epoch_seconds=30, epochs_done=1, max_epochs=16) == 4
    assert recipe.plan_epochs(seconds_left=1000, epoch_seconds=30, epochs_done=1, max_epochs=16) == 16  # the cap
    assert recipe.plan_epochs(seconds_left=20, epoch_seconds=30, epochs_done=1, max_epochs=16) == 1  # none more fits
    assert recipe.plan_epochs(seconds_left=-5, epoch_seconds=30, epochs_done=1, max_epochs=16) == 1  # already late
    # epoch 1: 40 s in all, 30 s of training in 11 steps, the first of which took 5 s (waiting for
    # data): a later epoch should take 40 - 5 + 2.5 s
    assert recipe.steady_epoch_seconds(40.0, 30.0, 5.0, steps=11) == pytest.approx(37.5)
    assert recipe.steady_epoch_seconds(40.0, 30.0, 30.0, steps=1) == 40.0  # one step: nothing to separate


def test_epochs_to_train_keeps_a_time_budget_plan_across_a_resume():
    from unet_ray.config import TrainConfig

    cfg = TrainConfig.from_dict({"optim": {"epochs": 30, "time_budget": 20}})
    assert worker.epochs_to_train(cfg, None, deadline=None) == (30, False)  # no budget: optim.epochs
    assert worker.epochs_to_train(cfg, None, deadline=1e9) == (30, True)  # a new run plans after epoch 1
    assert worker.epochs_to_train(cfg, {"epoch": 3, "budget_epochs": 12}, deadline=1e9) == (12, False)
    # a checkpoint from before the plan (or without a budget) plans again; a smaller cap wins
    assert worker.epochs_to_train(cfg, {"epoch": 3}, deadline=1e9) == (30, True)
    fewer = TrainConfig.from_dict({"optim": {"epochs": 10, "time_budget": 20}})
    assert worker.epochs_to_train(fewer, {"epoch": 3, "budget_epochs": 12}, deadline=1e9) == (10, False)
    # without a budget a resumed run follows optim.epochs (resuming with more epochs stretches it)
    assert worker.epochs_to_train(cfg, {"epoch": 3}, deadline=None) == (30, False)


def test_a_budget_plan_follows_the_pace_cutting_at_once_and_adding_with_room_to_spare():
    # the first plan: as many as fit at the pace, up to the cap
    assert worker.budget_plan(1, 375.0, None, 16, pace=37.5) == 11  # 1 + 375 // 37.5
    assert worker.budget_plan(1, 9999.0, None, 16, pace=37.5) == 16
    # later: behind (5 more fit at 45 s, 6 planned) -> one fewer at once; past the deadline -> stop now
    assert worker.budget_plan(5, 6 * 37.5, 11, 16, pace=45.0) == 10
    assert worker.budget_plan(5, -1.0, 11, 16, pace=45.0) == 5
    # ahead: one more epoch is added only when it fits with half an epoch to spare
    assert worker.budget_plan(5, 7 * 37.5, 11, 16, pace=37.5) == 11  # 7 more would just fit: no swing
    assert worker.budget_plan(5, 7.5 * 37.5, 11, 16, pace=37.5) == 12
    assert worker.budget_plan(5, 99 * 37.5, 11, 16, pace=37.5) == 16  # never past the cap


def test_the_pace_is_the_recent_epochs_and_the_first_does_not_count_its_wait_for_data():
    # epoch 1: 40 s in all, 30 s of training in 11 steps, the first of which waited 5 s for data
    first = {"epoch_seconds": 40.0, "train_seconds": 30.0, "first_step_s": 5.0}
    assert worker.epoch_pace(first, first_of_session=True, steps_per_epoch=11) == pytest.approx(37.5)
    assert worker.epoch_pace(first, first_of_session=False, steps_per_epoch=11) == 40.0
    assert worker.recent_pace([37.5]) == 37.5
    assert worker.recent_pace([100.0, 30.0, 40.0, 50.0]) == pytest.approx(40.0)  # the last PACE_EPOCHS only
    assert worker.PACE_EPOCHS == 3


def test_ema_update_equals_torchs_and_leaves_its_counter_where_it_is(monkeypatch):
    """recipe.WeightEMA gives the weights torch's AveragedModel gives with the same EMA function,
    BatchNorm statistics and counters included, without copying its step counter anywhere on an
    update (torch's copies it to the weights' device on every step: a host-device sync on a GPU)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ours = recipe.build_ema(model, 0.8)
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=True)
    moved = []
    real_to = torch.Tensor.to
    for _ in range(4):
        model.train()
        model(torch.randn(2, 3, 8, 8))  # moves the BatchNorm statistics and its batch counter
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: moved.append(self.shape) or real_to(self, *a, **k))
        ours.update_parameters(model)
        monkeypatch.setattr(torch.Tensor, "to", real_to)
        theirs.update_parameters(model)
    assert moved == []
    assert ours.n_averaged.device.type == "cpu" and int(ours.n_averaged) == int(theirs.n_averaged) == 4
    for (name, got), want in zip(ours.module.state_dict().items(), theirs.module.state_dict().values()):
        assert torch.equal(got, want), name
    assert not torch.equal(ours.module[0].weight, model[0].weight)  # an average, not a copy
