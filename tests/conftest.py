"""Shared fixtures: small synthetic pairs folders in the users' format (no Ray anywhere), and a
guard that fails a test which starts Ray."""

from __future__ import annotations

import io
import os
import sys

import numpy as np
import pytest
from PIL import Image

from unet_ray import pairs

_EXIT_STATUS = pytest.StashKey[int]()
_CALL_FAILED = pytest.StashKey[bool]()


def pytest_configure(config):
    # No test's Ray may report usage stats; set at configure time so every subprocess inherits it.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # The tests' own torch work (tiny models, in this process) on one thread: with two OpenMP
    # threads on a 2-core machine that Ray processes also use, they wait on each other (measured:
    # test_engine's 32 steps took 51 s with 2 threads, 5 s with 1, on a loaded machine). Ray's
    # workers and the commands the tests start set their own threads.
    import torch

    torch.set_num_threads(1)


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End a run that used Ray in this process with pytest's own exit status, without Python's
    interpreter finalization. Once (2026-12-01, 1 of 4 full runs), the suite segfaulted there
    *after* printing "304 passed": Ray's core worker is not safe to tear down after several
    ray.init/ray.shutdown cycles in one process (ray-project/ray#31145). Every test has run and
    been reported by then; what is skipped is only that teardown."""
    if "ray" in sys.modules and _EXIT_STATUS in config.stash:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(config.stash[_EXIT_STATUS])


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Remember whether the test itself failed (for ray_must_not_start's teardown check)."""
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    return report


class RayStartRecorder:
    """What `ray_must_not_start` saw: one entry per attempt to start or join Ray."""

    def __init__(self):
        self.calls: list[str] = []

    def refuse(self, what: str):
        def refused(*args, **kwargs):
            self.calls.append(f"{what}(args={args!r}, kwargs={kwargs!r})")
            raise AssertionError(f"Ray must not start in this test, but {what} was called")

        return refused


@pytest.fixture
def ray_must_not_start(monkeypatch, request):
    """Fail the test if anything starts (or joins) Ray, whatever earlier tests did to this process.

    Patches `ray.init` itself, which every start goes through, and the package's `ensure_ray`
    wherever a module defines it: ensure_ray returns without calling ray.init when an earlier test
    left a Ray running in this process, so patching ray.init alone would then see nothing. The
    patched functions record the call and raise AssertionError; the fixture also checks the
    record at teardown, in case the code under test swallowed the error and the test passed."""
    import importlib

    import ray

    recorder = RayStartRecorder()
    monkeypatch.setattr(ray, "init", recorder.refuse("ray.init"))
    for name in ("unet_ray.train", "unet_ray.raysession"):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a module that is there but fails to import is an error
                raise
            continue  # unet_ray.raysession: not (yet) in this tree
        if hasattr(module, "ensure_ray"):
            monkeypatch.setattr(module, "ensure_ray", recorder.refuse(f"{name}.ensure_ray"))
    yield recorder
    if not request.node.stash.get(_CALL_FAILED, False):  # a failed test has reported it already
        assert not recorder.calls, f"Ray must not start in this test, but: {recorder.calls}"


@pytest.fixture
def pairs_folder(tmp_path):
    """A pairs folder with train/1..3.jpg and val/1..2.jpg."""
    return pairs.write_synthetic(tmp_path / "pairs", 3, 2, seed=0)


@pytest.fixture
def make_pairs_folder(tmp_path):
    """Factory: make_pairs_folder(n_train, n_val, seed=0, name="pairs") -> folder."""

    def make(n_train: int, n_val: int, seed: int = 0, name: str = "pairs"):
        return pairs.write_synthetic(tmp_path / name, n_train, n_val, seed=seed)

    return make


@pytest.fixture
def pair_jpeg_bytes():
    """One real synthetic pair as JPEG bytes."""
    return pairs.synth_pair_bytes(np.random.default_rng(123))


def encode(array: np.ndarray, fmt: str = "JPEG", **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def jpeg_claiming_a_huge_size(width: int = 8, height: int = 8) -> bytes:
    """A small valid JPEG whose frame header claims 65000x65000 pixels: PIL refuses it at open
    with DecompressionBombError (more than 2 x Image.MAX_IMAGE_PIXELS)."""
    data = bytearray(encode(np.zeros((height, width, 3), np.uint8)))
    i = 2  # after SOI: walk the marker segments to the frame header (SOF0..SOF2)
    while data[i + 1] not in (0xC0, 0xC1, 0xC2):
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    data[i + 5 : i + 9] = (65000).to_bytes(2, "big") * 2  # height, width
    return bytes(data)
