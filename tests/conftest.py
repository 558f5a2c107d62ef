"""Shared fixtures: small synthetic pairs folders in the users' format (no Ray anywhere), and a
guard that fails a test which starts Ray."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from helpers import free_port
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


# The README's test command runs the suite in two pytest-xdist workers (-n 2, --dist loadfile:
# each module whole in one worker, its fixtures made once). Alone, the suite kept 2 cores
# ~63 % busy (often one core only: Ray start-ups, job submissions, one-thread tests); two workers
# kept them ~91 % busy. A worker takes the next module in this order when it is nearly done with
# its own: the modules with the longest Ray runs first (serial seconds, 2026-12-06: 113, 97, 77,
# 64, 62, 57, 50, 33), so that the two workers end together.
LONGEST_MODULES_FIRST = (
    "test_train_ray", "test_cluster", "test_reliability", "test_tune", "test_console", "test_predict",
    "test_dashboard", "test_tracking",
)  # fmt: skip


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.stem
        return LONGEST_MODULES_FIRST.index(name) if name in LONGEST_MODULES_FIRST else len(LONGEST_MODULES_FIRST)

    items.sort(key=rank)  # stable: a module's own order is kept, the other modules stay in theirs


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


@dataclass
class S3Server:
    """A moto S3 server on 127.0.0.1 (see the `s3_server` fixture)."""

    endpoint: str
    env: dict[str, str]
    process: subprocess.Popen = field(repr=False)
    log: Path = field(repr=False)

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (if absent); returns "s3://name"."""
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(
            endpoint_override=self.endpoint, region=self.env["AWS_DEFAULT_REGION"], access_key=self.env["AWS_ACCESS_KEY_ID"],
            secret_key=self.env["AWS_SECRET_ACCESS_KEY"], allow_bucket_creation=True, connect_timeout=5,
        )  # fmt: skip
        fs.create_dir(name)
        return f"s3://{name}"

    @contextlib.contextmanager
    def enforce_auth(self):
        """Make the server check signatures and IAM permissions, as AWS does, inside the block.

        moto accepts any key and signature unless told otherwise (its INITIAL_NO_AUTH_ACTION_COUNT,
        which /moto-api/reset-auth sets at run time; "inf" by default). With it on, only access
        keys of moto's IAM users sign correctly, so this creates one, allowed s3:*, and yields
        (access key id, secret key); self.env's testing-key is then an unknown key. The server is
        shared by the session, so the block always ends with auth off again."""
        import boto3

        iam = boto3.client(
            "iam", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup"
        )
        name = f"storage-user-{len(iam.list_users()['Users'])}"
        iam.create_user(UserName=name)
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName=name, PolicyName="s3-all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        self._reset_auth("0")
        try:
            yield key["AccessKeyId"], key["SecretAccessKey"]
        finally:
            self._reset_auth("inf")

    def _reset_auth(self, count: str) -> None:
        # text/plain: with urllib's default form type, the server would parse the body away
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth", data=count.encode(), method="POST", headers={"Content-Type": "text/plain"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200, response.read()


def _wait_for_moto(process: subprocess.Popen, endpoint: str, log: Path, last_try: bool) -> bool:
    """True once the server answers (at most 60 s); False if it exited early (a taken port) and
    this is not the last try."""
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            if not last_try:
                return False
            pytest.fail(f"moto server exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
                return True
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                pytest.fail(f"moto server did not answer on {endpoint} within 60 s: {log.read_text()[-2000:]}")
            time.sleep(0.2)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 API for the session: moto's server in a subprocess on 127.0.0.1, with
    .endpoint, .env (the AWS variables that point a client at it), .make_bucket(name) and
    .enforce_auth(). Its process group is killed at the end. A subprocess given .env should not
    inherit the machine's other AWS_* variables (AWS_ENDPOINT_URL_S3 would win over .env's)."""
    if importlib.util.find_spec("moto") is None:  # not imported here: the server runs in its own process
        pytest.skip("needs moto[server] (the test extra)")
    log = tmp_path_factory.mktemp("moto") / "server.log"
    server_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    for attempt in range(3):  # another process may take the free port before the server binds it
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=out, stderr=subprocess.STDOUT, env=server_env, start_new_session=True,
            )  # fmt: skip
        if _wait_for_moto(process, endpoint, log, last_try=attempt == 2):
            break
    try:
        env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing-key",
            "AWS_SECRET_ACCESS_KEY": "testing-secret-9f3Kq2",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",  # the SDKs read it before AWS_DEFAULT_REGION
            # no instance-metadata lookups, and no ~/.aws profile of the machine's user
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(log.parent / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(log.parent / "no-aws-credentials"),
        }
        yield S3Server(endpoint=endpoint, env=env, process=process, log=log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """`s3_server.env` in os.environ for this test (and no other AWS setting of the machine)."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server
