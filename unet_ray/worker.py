"""Ray Train: what runs on every training worker (the TorchTrainer's `train_loop_per_worker`).

The driver side, which builds and runs the TorchTrainer, is in train.py.
"""

from __future__ import annotations

import errno
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from unet_ray import checkpoint as ckpt_io
from unet_ray import console, engine, jsonfile, metrics, recipe
from unet_ray import gpu as gpu_path
from unet_ray.config import TrainConfig
from unet_ray.data import steps_per_epoch
from unet_ray.model import build_model

SHUFFLE_BUFFER_BATCHES = 4  # rows mixed per epoch: this many batches' worth at a time
# A time budget keeps this much back for what follows the last epoch (best.json, the report,
# Ray shutting down): measured 1.5-2 s from the end of the last epoch to the run's summary
FINISH_RESERVE_S = 5.0
PACE_EPOCHS = 3  # a time budget plans with the mean time of this many latest epochs


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.from_dict(loop_config["cfg"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    # Steps per epoch of this worker group: the train split is divided equally among its workers,
    # each with the configured batch, so an elastic group that shrinks or grows takes more or
    # fewer (larger or smaller global) steps per epoch; the schedule is planned in epochs and
    # turned into this group's steps (recipe.StepSchedule).
    steps = steps_per_epoch(loop_config["train_rows"], world_size, cfg.optim.batch_size, drop_last=cfg.run.compile)
    shown = {**(loop_config.get("console") or console.EPOCH_LINES_ONLY), "batches": steps}  # what rank 0 prints
    console.quiet_train_worker(shown)
    torch.set_num_threads(loop_config["torch_threads"])
    device = ray.train.torch.get_device()

    state = None
    restored = ray.train.get_checkpoint()
    if restored is not None:
        # Loaded to the CPU: load_state_dict copies weights and optimizer moments to the device,
        # while AdamW's step counters stay on the CPU as in a fresh run. Loaded onto a GPU, those
        # counters would cost two host-device syncs per parameter on every later step.
        with restored.as_directory() as folder:
            state = ckpt_io.load_state(folder)
    start_epoch = state["epoch"] if state else 0

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    batch_size = cfg.optim.batch_size

    def train_batches():
        # a compiled model gets one batch shape only: no recompilation for a last partial batch
        return shuffled_batches(train_shard, batch_size, device, drop_last=cfg.run.compile)

    deadline = loop_config.get("deadline")  # unix time; set by a time budget (optim.time_budget)
    planned, plan_pending = epochs_to_train(cfg, state, deadline)
    # Start the first epoch's data now, while the model is built and wrapped in DDP: in a fresh
    # Ray the first augment tasks spend seconds importing albumentations (measured: 3 s of the
    # first-batch wait), which would otherwise begin only once the model is ready.
    first_batches = start_in_background(train_batches()) if start_epoch < planned else None

    weights = loss_class_weights(state, loop_config.get("class_weights"))
    weights_on_device = None if weights is None else weights.to(device)  # once, not in every loss call
    if device.type == "cuda":  # one input shape per run: cuDNN picks its fastest convolutions once
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.run.seed)
    deep_supervision = cfg.model.deep_supervision
    net = build_model(cfg.model, cfg.num_classes, aux_heads=deep_supervision > 0)
    bf16 = recipe.use_bf16(cfg.run.precision, device)
    # channels_last in every precision: it is what makes bf16 convolutions fast, and in fp32 on an
    # AVX2-only CPU (no native bf16) it trained 15-20 % more images/s too (2 workers, 128 px)
    net = net.to(memory_format=torch.channels_last)
    # `net` itself holds the weights for checkpoints and evaluates eagerly; the compiled module
    # (sharing them) trains. DDP is wrapped first and compiled with the model, as PyTorch
    # recommends: the compiler then splits the graph at DDP's gradient buckets, so that their
    # all-reduce overlaps the backward pass (DDP around a compiled module waits for all of it).
    model = gpu_path.compile_model(ray.train.torch.prepare_model(net), cfg.run.compile)
    plain = net
    optimizer = recipe.build_optimizer(model.parameters(), cfg.optim)
    schedule = recipe.StepSchedule(optimizer, cfg.optim, steps, epochs=planned)
    ema = recipe.build_ema(plain, cfg.optim.ema_decay)
    validated = ema.module if ema is not None else plain  # what is validated, saved as "model", served

    best_iou, restored_from = float("-inf"), 0
    if state is not None:
        restore_training_state(state, plain, optimizer, schedule, ema)
        best_iou = state.get("best_val_iou", best_iou)
        restored_from = start_epoch
        if rank == 0 and shown["lines"]:
            print(f"[unet-ray] resumed from epoch {start_epoch} checkpoint", flush=True)

    epoch, paces = start_epoch, []  # paces: seconds per epoch, for a time budget's plans
    while epoch < planned:  # a time budget plans `planned` after the first epoch, then follows the pace
        epoch += 1
        epoch_start, epoch_started_at = time.perf_counter(), time.time()
        batches = gpu_path.DataWaitMeter(first_batches if epoch == start_epoch + 1 else train_batches(), device)
        stats = engine.train_one_epoch(
            model,
            console.track(batches, shown if rank == 0 else None, epoch, planned, ctx.get_world_size()),
            optimizer,
            device,
            dice_weight=cfg.optim.dice_weight,
            class_weights=weights_on_device,
            mixed_precision=bf16,
            channels_last=True,
            scheduler=schedule,
            ema=ema,
            deep_supervision=deep_supervision,
        )
        # Every rank validates with rank 0's BatchNorm statistics (and EMA), the ones the
        # checkpoint holds: DDP copies them only at the start of a training forward, and each
        # rank's last batch has moved its own copy since. Without this, N-worker IoU would not
        # equal `evaluate`'s.
        _broadcast_buffers_from_rank_0(validated)
        # Evaluate the unwrapped module: val shards may differ in batch count between workers, and
        # a DDP forward could wait on a collective that the other rank never joins.
        confusion = engine.evaluate(
            validated,
            val_shard.iter_torch_batches(
                batch_size=batch_size, prefetch_batches=2, **gpu_path.torch_batch_options(device)
            ),
            cfg.num_classes,
            device,
            # fp32 everywhere (TF32 off on GPUs: engine.exact_fp32): its IoU then equals what
            # `unet-ray evaluate` (fp32, one process) computes from the checkpoint; validation is a
            # small share of an epoch
            mixed_precision=False,
            channels_last=True,
            native=loop_config.get("native_masks", False),
        )
        for matrix in confusion.values():
            matrix.all_reduce()
        scores = confusion["train_size"].compute()
        native = {}
        if "native" in confusion:  # the IoU at the pairs' own 256x256 masks, logits upsampled
            native_scores = confusion["native"].compute()
            native = {
                "val_iou_native": metrics.headline(native_scores, cfg.num_classes)["val_iou"],
                "val_miou_native": native_scores["miou"],
                "val_iou_per_class_native": jsonfile.json_ready(native_scores["iou_per_class"]),
            }
        images, seconds, loss = _all_reduce_train_stats(stats, device)
        steady_images, steady_seconds, _ = _all_reduce_train_stats(steady_share(stats), device)
        report = {
            "epoch": epoch,
            **metrics.headline(scores, cfg.num_classes),
            "val_miou": scores["miou"],
            "val_pixel_accuracy": scores["pixel_accuracy"],
            "val_iou_per_class": jsonfile.json_ready(scores["iou_per_class"]),  # None: class absent
            "val_pixels": int(confusion["train_size"].mat.sum()),
            **native,
            "train_loss": loss,
            "lr": schedule.get_last_lr(),  # after the epoch's last step
            "images_per_s": images / seconds if seconds > 0 else 0.0,
            # after each worker's first step: without the wait for the epoch's data pipeline to start
            "images_per_s_steady": steady_images / steady_seconds if steady_seconds > 0 else 0.0,
            "epoch_seconds": time.perf_counter() - epoch_start,
            "epoch_started_at": epoch_started_at,  # unix time; with first_step_s, when training began
            "first_step_s": stats["first_step_seconds"],  # waiting for the first batch + one step
            "train_seconds": stats["train_seconds"],  # this worker's; with epoch_started_at, when it trained
            # this worker's share of training time (after the first batch) the device sat waiting for data
            **batches.summary(stats["train_seconds"]),
            "restored_from_epoch": restored_from,  # > 0 on the first epoch after a restart or resume
            # workers that trained this epoch: an elastic group's size changes when nodes go or come
            "world_size": world_size,
            "steps_per_epoch": steps,
            # how this epoch ran, as measured, for the record and the GPU test
            "dist_backend": _dist_backend(),
            "logits_dtype": stats["logits_dtype"],  # bfloat16 under autocast
            "channels_last": stats["channels_last"],
        }
        if deadline is not None:
            seconds_left = deadline - time.time() - FINISH_RESERVE_S
            paces.append(epoch_pace(report, epoch == start_epoch + 1, steps))
            pace = recent_pace(paces)
            new_plan = budget_plan(epoch, seconds_left, None if plan_pending else planned, cfg.optim.epochs, pace)
            # rank 0 decides, so that every worker trains the same number of epochs
            new_plan = _from_rank_0(new_plan, device)
            if plan_pending or new_plan != planned:
                planned = new_plan
                schedule.replan(planned)
                report["lr"] = schedule.get_last_lr()  # what the next step uses, now on the new plan
                if rank == 0 and shown["lines"]:
                    line = console.budget_line(cfg.optim.time_budget, planned, cfg.optim.epochs, pace, seconds_left)
                    print(line, flush=True)
            plan_pending = False
        report["epochs_planned"] = planned
        restored_from = 0
        best_iou = max(best_iou, report["val_iou"])
        report["best_val_iou"] = best_iou
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:  # one writer; every rank reports
                ckpt_io.save_state(
                    tmp,
                    {
                        **training_state(plain, optimizer, schedule, ema),
                        "class_weights": None if weights is None else weights.tolist(),
                        "epoch": epoch,
                        # a time budget's plan, kept by a resume or restart (absent without a budget,
                        # so that a run resumed with more epochs still stretches its schedule)
                        **({"budget_epochs": planned} if deadline is not None else {}),
                        "best_val_iou": best_iou,
                        "metrics": {k: v for k, v in report.items() if not isinstance(v, list)},
                        "config": cfg.to_dict(),
                    },
                )
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
                if shown["lines"]:
                    print(console.epoch_line(report, planned), flush=True)
            try:
                ray.train.report(report, checkpoint=checkpoint)
            except OSError as e:
                raise checkpoint_not_written(e, epoch, loop_config.get("storage_dir")) from None


class CheckpointNotWritten(OSError):
    """A checkpoint could not be copied to the run's storage (a full disk, say)."""


def checkpoint_not_written(error: OSError, epoch: int, storage_dir: str | None) -> OSError:
    """One line that names the storage and says what survives. Ray copies the checkpoint with
    pyarrow, whose error names neither; a copy that fails leaves the earlier checkpoints as they
    were (each is its own folder), so the run resumes from the last one once there is room."""
    if error.errno != errno.ENOSPC and "No space left" not in str(error):
        return error
    where = storage_dir or "the run's storage path"
    return CheckpointNotWritten(
        errno.ENOSPC,
        f"the checkpoint of epoch {epoch} cannot be written to {where}: no space left on device. "
        "The run's earlier checkpoints there are intact: free space and run the same command again to resume",
    )


def budget_plan(epochs_done: int, seconds_left: float, planned: int | None, max_epochs: int, pace: float) -> int:
    """Epochs a time-budget run trains in all, decided after epoch `epochs_done` at `pace` seconds
    an epoch (recent_pace) with `seconds_left` to its deadline.

    The first plan (`planned` None) takes as many epochs as fit, up to `max_epochs`. Later ones cut
    epochs as soon as the run would end past its deadline, and add them back only with half an
    epoch to spare, so that a plan on the edge does not swing back and forth."""
    fits = recipe.plan_epochs(seconds_left, pace, epochs_done, max_epochs)
    if planned is None or fits < planned:
        return fits
    return max(planned, recipe.plan_epochs(seconds_left - pace / 2, pace, epochs_done, max_epochs))


def recent_pace(paces: list[float]) -> float:
    """Seconds an epoch, from the times of this session's epochs (epoch_pace): the mean of the last
    PACE_EPOCHS, which follows a machine that speeds up or slows down within a few epochs and is
    not thrown by one slow epoch."""
    recent = paces[-PACE_EPOCHS:]
    return sum(recent) / len(recent)


def epoch_pace(report: dict[str, Any], first_of_session: bool, steps_per_epoch: int) -> float:
    """What the epoch `report` describes says about the next ones: its time, except that the first
    epoch of a session also waited for the data pipeline to start (recipe.steady_epoch_seconds)."""
    if not first_of_session:
        return report["epoch_seconds"]
    return recipe.steady_epoch_seconds(report["epoch_seconds"], report["train_seconds"], report["first_step_s"], steps_per_epoch)


def epochs_to_train(cfg: TrainConfig, state: dict[str, Any] | None, deadline: float | None) -> tuple[int, bool]:
    """(epochs the run trains and its schedule spans, whether a time budget has yet to plan them).

    Without a budget: optim.epochs. With one (`deadline`, unix time), a run plans after its first
    epoch; one resumed or restarted after that starts from the plan its checkpoint holds (at most
    optim.epochs), so that its schedule continues exactly, and adjusts it to the pace from there."""
    if deadline is None:
        return cfg.optim.epochs, False
    if state is not None and "budget_epochs" in state:
        return min(int(state["budget_epochs"]), cfg.optim.epochs), False
    return cfg.optim.epochs, True


def training_state(plain, optimizer, schedule, ema) -> dict[str, Any]:
    """What a checkpoint holds to serve the model and to resume exactly. "model" is what is
    validated and served (the EMA weights when there is an EMA); "train_model" the raw weights
    that training continues from; then optimizer, schedule and EMA counters."""
    state = {
        "model": (ema.module if ema is not None else plain).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": schedule.state_dict(),
    }
    if ema is not None:
        state["train_model"] = plain.state_dict()
        state["ema_updates"] = int(ema.n_averaged)
    return state


def loss_class_weights(state: dict[str, Any] | None, computed: list[float] | None) -> torch.Tensor | None:
    """The loss's weight per class (None: unweighted). A new run takes the ones the driver computed
    from the training pixels (the same on every worker); a resumed run the ones its checkpoint
    trained with, so that its loss does not change at the resume. Checkpoints written before
    `optim.class_weights` existed have no such entry and trained unweighted."""
    if state is not None and "class_weights" in state:
        computed = state["class_weights"]
    elif state is not None and "class_weights" not in state.get("config", {}).get("optim", {}):
        computed = None
    return torch.tensor(computed, dtype=torch.float32) if computed else None


def restore_training_state(state: dict[str, Any], plain, optimizer, schedule, ema) -> None:
    """The inverse of training_state: the next step continues as if the run had not stopped."""
    plain.load_state_dict(state.get("train_model", state["model"]))
    optimizer.load_state_dict(state["optimizer"])
    if "scheduler" in state:
        schedule.load_state_dict(state["scheduler"])
    if ema is not None:
        ema.module.load_state_dict(state["model"] if "train_model" in state else plain.state_dict())
        ema.n_averaged.fill_(state.get("ema_updates", 0))


def shuffled_batches(
    shard: Any, batch_size: int, device: torch.device | str = "cpu", drop_last: bool = False
) -> Iterable[Any]:
    """One epoch of `shard` (a Ray Data iterator or dataset) as torch batches on `device`, in a
    new row order every epoch, as a DataLoader with shuffle=True gives: rows are mixed in a local
    buffer of at least a few batches, which Ray fills with whole blocks (the blocks arrive in a new
    random order too, and hold rows of the whole data set: see data.build_datasets).
    On CUDA the batches arrive pinned and copied ahead of the loop (gpu.torch_batch_options)."""
    return shard.iter_torch_batches(
        batch_size=batch_size, prefetch_batches=2, local_shuffle_buffer_size=SHUFFLE_BUFFER_BATCHES * batch_size,
        drop_last=drop_last, **gpu_path.torch_batch_options(device),
    )  # fmt: skip


def start_in_background(batches: Iterable[Any]) -> Iterator[Any]:
    """`batches`, whose first item is already being fetched by a thread (the rest as usual)."""
    source = iter(batches)
    first: list[Any] = []
    failure: list[BaseException] = []

    def fetch() -> None:
        try:
            first.append(next(source))
        except StopIteration:
            pass
        except BaseException as e:  # re-raised in the consumer, where the training loop sees it
            failure.append(e)

    fetcher = threading.Thread(target=fetch, name="first-batch", daemon=True)
    fetcher.start()

    def replay() -> Iterator[Any]:
        fetcher.join()
        if failure:
            raise failure[0]
        if first:
            yield first[0]
            yield from source

    return replay()


def steady_share(stats: dict[str, float]) -> dict[str, float]:
    """train_one_epoch's stats without the first step (which also waited for the data pipeline to
    start): the images and seconds of the steady state, for images_per_s_steady."""
    return {
        "train_images": stats["train_images"] - stats["first_step_images"],
        "train_seconds": max(stats["train_seconds"] - stats["first_step_seconds"], 0.0),
        "train_loss": 0.0,
    }


def _dist_backend() -> str:
    import torch.distributed as dist

    return str(dist.get_backend()) if dist.is_available() and dist.is_initialized() else "none"


def _from_rank_0(value: int, device: torch.device) -> int:
    """Rank 0's `value` on every rank (itself when there is one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    shared = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(shared, src=0)
    return int(shared.item())


def _broadcast_buffers_from_rank_0(module: torch.nn.Module) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def _all_reduce_train_stats(stats: dict[str, float], device: torch.device) -> tuple[float, float, float]:
    """(images over all workers, slowest worker's seconds, mean loss over workers)."""
    import torch.distributed as dist

    images = torch.tensor([stats["train_images"], stats["train_loss"]], dtype=torch.float64, device=device)
    seconds = torch.tensor([stats["train_seconds"]], dtype=torch.float64, device=device)
    world = 1
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        dist.all_reduce(images)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return float(images[0]), float(seconds[0]), float(images[1]) / world
