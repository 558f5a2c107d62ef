"""The GPU path's parts, tested on CPU: torch.compile (same outputs as eager), batches handed to
the device pinned and non-blocking, and the data-wait meter. No Ray cluster."""

from __future__ import annotations

import shutil
import time
from unittest import mock

import pytest
import torch

from unet_ray import cli, gpu
from unet_ray.model import UNet
from unet_ray.worker import shuffled_batches


def test_compile_flag_and_config_key():
    assert cli.config_from_args(cli.build_parser().parse_args(["train", "--compile"])).run.compile is True
    assert cli.config_from_args(cli.build_parser().parse_args(["train"])).run.compile is False
    net = UNet(2, depth=1, base_channels=4)
    assert gpu.compile_model(net, enabled=False) is net


def _compile_toolchain_missing() -> str | None:
    """Why torch.compile cannot run on this CPU, or None (inductor builds C++ with the system compiler)."""
    from torch._inductor import config as inductor_config

    compiler = inductor_config.cpp.cxx[0] or "g++"
    return None if shutil.which(compiler) else f"torch.compile on CPU needs a C++ compiler ({compiler} not on PATH)"


@pytest.mark.timeout(240)
def test_compiled_unet_trains_like_eager():
    """One training forward and backward of a tiny UNet: compiled outputs and gradients equal
    eager ones within float tolerance (~20 s on 2 cores, most of it compiling)."""
    reason = _compile_toolchain_missing()
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    net = UNet(2, depth=1, base_channels=4)
    compiled = gpu.compile_model(net, enabled=True)
    assert compiled is not net
    x = torch.randn(2, 3, 16, 16)

    def run(module):
        net.zero_grad(set_to_none=True)
        out = module(x)
        (out.square().mean()).backward()
        return out.detach(), [p.grad.clone() for p in net.parameters()]

    eager_out, eager_grads = run(net)
    compiled_out, compiled_grads = run(compiled)  # the same parameters: compile shares them
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-4, atol=1e-5)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
    # checkpoints keep using `net`: its keys carry no `_orig_mod.` prefix
    assert set(net.state_dict()) == {k.removeprefix("_orig_mod.") for k in compiled.state_dict()}


def test_batches_for_cuda_are_pinned_and_copied_non_blocking_by_ray():
    """The worker asks Ray Data for pinned batches on the CUDA device; Ray's fetch thread copies
    them with non_blocking=True (its default, unless an environment variable turns it off)."""
    from ray.data.util import torch_utils

    shard = mock.Mock()
    cuda = torch.device("cuda", 0)
    shuffled_batches(shard, batch_size=8, device=cuda, drop_last=True)
    kwargs = shard.iter_torch_batches.call_args.kwargs
    assert (kwargs["device"], kwargs["pin_memory"], kwargs["drop_last"]) == (cuda, True, True)
    shuffled_batches(shard, batch_size=8)
    kwargs = shard.iter_torch_batches.call_args.kwargs
    assert (kwargs["device"].type, kwargs["pin_memory"], kwargs["drop_last"]) == ("cpu", False, False)
    assert torch_utils.DEFAULT_TENSOR_NON_BLOCKING_TRANSFER is True
    # what the default finalize step does with a batch: .to(device, non_blocking=True)
    tensor = mock.Mock(spec=torch.Tensor)
    torch_utils.move_tensors_to_device({"image": tensor}, device=cuda)
    tensor.to.assert_called_once_with(cuda, non_blocking=True)


def test_move_batch_pins_then_copies_non_blocking_to_cuda():
    cuda = torch.device("cuda", 0)
    host = mock.Mock(spec=torch.Tensor, device=torch.device("cpu"))
    host.is_pinned.return_value = False
    pinned = host.pin_memory.return_value
    out = gpu.move_batch({"image": host}, cuda)
    host.pin_memory.assert_called_once_with()
    pinned.to.assert_called_once_with(cuda, non_blocking=True)
    assert out["image"] is pinned.to.return_value
    # already pinned: no second host copy
    host2 = mock.Mock(spec=torch.Tensor, device=torch.device("cpu"))
    host2.is_pinned.return_value = True
    gpu.move_batch({"image": host2}, cuda)
    host2.pin_memory.assert_not_called()
    host2.to.assert_called_once_with(cuda, non_blocking=True)
    # on CPU nothing is pinned or copied
    t = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    assert gpu.move_batch({"image": t}, torch.device("cpu"))["image"] is t
    if torch.cuda.is_available():  # the real thing, where there is a GPU
        moved = gpu.move_batch({"image": t}, torch.device("cuda"))["image"]
        assert moved.is_cuda and torch.equal(moved.cpu(), t)


def test_data_wait_meter_measures_the_wait_for_each_batch():
    def slow_batches(n=4, delay=0.05):
        for i in range(n):
            time.sleep(delay)
            yield i

    meter = gpu.DataWaitMeter(slow_batches(), torch.device("cpu"))
    start = time.perf_counter()
    for _ in meter:
        time.sleep(0.05)  # the "step"
    seconds = time.perf_counter() - start
    waits = meter.waits()
    assert len(waits) == 4 and all(0.04 < w < 0.5 for w in waits)
    summary = meter.summary(seconds)
    assert 0.35 < summary["data_wait_share"] < 0.65  # half of every step after the first batch
    assert summary["first_batch_wait_s"] == waits[0]
    assert gpu.DataWaitMeter([], "cpu").summary(1.0)["data_wait_share"] == 0.0
