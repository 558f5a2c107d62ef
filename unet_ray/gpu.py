"""What makes the GPU path fast, in one place the worker, the GPU check and the tests share:

- `compile_model`: `torch.compile` of the UNet (`run.compile`, `unet-ray train --compile`);
- `torch_batch_options`: how Ray Data hands batches to the device (pinned host memory, a
  non-blocking copy made by Ray's fetch thread, not by the training loop);
- `DataWaitMeter`: how long the device sat idle waiting for each next batch.

Everything here also runs on CPU (where it changes nothing or measures host time), so it is
tested without a GPU.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

COMPILE_BACKEND_ENV = "UNET_RAY_COMPILE_BACKEND"  # torch.compile backend; default inductor


def compile_model(net: nn.Module, enabled: bool) -> nn.Module:
    """`net` compiled with `torch.compile`, or `net` itself when not enabled.

    The compiled module shares `net`'s parameters and buffers: keep using `net` for state dicts
    (no `_orig_mod.` prefixes in checkpoints) and for evaluation (eager: no recompilation for
    eval mode or for a last partial batch). `dynamic=False`: one static graph per input shape,
    the fastest kernels; the training batches all have one shape (the worker drops the last
    partial batch when compiling).
    """
    if not enabled:
        return net
    # The GPU check's dry run sets aot_eager: the same tracing (Dynamo, AOT autograd) without
    # generating and building kernels, which takes a minute on a small CPU.
    return torch.compile(net, dynamic=False, backend=os.environ.get(COMPILE_BACKEND_ENV, "inductor"))


def torch_batch_options(device: torch.device | str) -> dict[str, Any]:
    """`iter_torch_batches` keywords that hand batches to `device` without needless host copies.

    On CUDA, Ray's collate threads pin each uint8 batch (`pin_memory=True`) and its fetch thread
    copies it to the GPU with `non_blocking=True` (Ray's default; see
    `ray.data.util.torch_utils.DEFAULT_TENSOR_NON_BLOCKING_TRANSFER`), ahead of the training loop:
    the loop gets tensors already on the device and `engine.to_model_input` converts them there.
    Pinning on CPU would only add a copy, so it is off there.
    """
    device = torch.device(device)
    return {"device": device, "pin_memory": device.type == "cuda"}


def move_batch(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on `device`: from pinned memory with a non-blocking copy when `device` is CUDA
    (the host does not wait for the copy), unchanged when it is already there."""
    device = torch.device(device)
    out = {}
    for name, tensor in batch.items():
        if tensor.device != device and device.type == "cuda" and not tensor.is_pinned():
            tensor = tensor.pin_memory()
        out[name] = tensor.to(device, non_blocking=device.type == "cuda")
    return out


class DataWaitMeter:
    """Wraps one epoch's batches and measures, for every batch, how long the device waited for it.

    On CUDA the wait is measured on the GPU: an event recorded when the loop asks for the next
    batch (the GPU reaches it when the previous step's queued work is done) and one when the
    batch has arrived; the time between the two is the GPU sitting idle for data. Host time in
    `next()` would overstate it (the host runs ahead of the GPU). Elsewhere host time is the
    device's time. The first batch (the pipeline starting) is reported apart.
    """

    def __init__(self, batches: Iterable[Any], device: torch.device):
        self.batches = batches
        self.cuda = torch.device(device).type == "cuda"
        self.host_waits: list[float] = []
        self._events: list[tuple[Any, Any]] = []

    def __iter__(self) -> Iterator[Any]:
        source = iter(self.batches)
        while True:
            asked = self._event()
            start = time.perf_counter()
            try:
                batch = next(source)
            except StopIteration:
                return
            self.host_waits.append(time.perf_counter() - start)
            if asked is not None:
                self._events.append((asked, self._event()))
            yield batch

    def _event(self):
        if not self.cuda:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def waits(self) -> list[float]:
        """Seconds the device waited for each batch (synchronizes the GPU once)."""
        if not self._events:
            return list(self.host_waits)
        self._events[-1][1].synchronize()
        return [asked.elapsed_time(got) / 1000 for asked, got in self._events]

    def summary(self, train_seconds: float) -> dict[str, float]:
        """data_wait_share: of the time after the first batch arrived, the share the device spent
        waiting for the next batch (0: never waited); data_wait_s: those seconds; first_batch_wait_s."""
        waits = self.waits()
        if not waits:
            return {"data_wait_share": 0.0, "data_wait_s": 0.0, "first_batch_wait_s": 0.0}
        steady = train_seconds - self.host_waits[0]
        waited = sum(waits[1:])
        return {
            "data_wait_share": min(1.0, waited / steady) if steady > 0 else 0.0,
            "data_wait_s": waited,
            "first_batch_wait_s": waits[0],
        }
