"""The Ray session of a command: join the cluster in RAY_ADDRESS or start a local Ray on
127.0.0.1 (token authentication on), and read a Ray error down to its cause.

The one low Ray-facing module that `prepare`, `predict`, `train`, `tune` and `cluster` share.
"""

from __future__ import annotations

import os

from unet_ray.config import ConfigError

# Ray settings for Ray's processes when they all share one machine: a local Ray (ensure_ray) and
# the nodes of a loopback cluster (`unet-ray cluster up`). Set with setdefault: a user's value wins.
ONE_MACHINE_RAY_ENV = {
    # Ray kills idle task workers beyond one per CPU. Our quarter-CPU data tasks (4 per CPU) then
    # start a fresh process every epoch and pay ~2 s importing albumentations (and torch) each
    # time. So keep as many as can run at once: 4 per CPU (8 on 2 cores, 64 on a 16-core node).
    "RAY_num_workers_soft_limit": str(4 * (os.cpu_count() or 2)),
    # How often Ray Train's controller polls its workers (Ray's default: 2 s, made for large
    # clusters). It also finds a finished run only at its next poll: a tiny 2-epoch run took 41 s
    # instead of 46-47 s from command to "done" (3 runs each, 2-core VM), at the same images/s.
    # Ray Train passes it from the driver to its controller and workers.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}



def ensure_ray(progress=print) -> None:
    """Join the cluster in RAY_ADDRESS (as inside `ray job submit`), else start a local Ray.

    A local Ray binds every port, the dashboard included, to 127.0.0.1, and keeps Ray's token
    authentication on.
    """
    address = os.environ.get("RAY_ADDRESS", "")
    if not address or any(host in address for host in ("127.0.0.1", "localhost")):
        # A local Ray, or a loopback cluster (unet-ray cluster up): without this Ray on Linux
        # advertises the machine's network address and its servers listen on every interface.
        # Set before `import ray`, which reads it once; see _keep_ray_on_loopback.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        _keep_ray_on_loopback()
    import ray

    if ray.is_initialized():
        return
    # Ray Train's print patch copies every print() of a worker to stderr as well: each progress
    # line would reach the terminal twice. Plain prints still reach the driver through Ray's log
    # forwarding. (Ray Train passes this variable on to the controller and the workers.)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    kwargs = {"log_to_driver": True, "configure_logging": True, "logging_level": "WARNING"}
    if address:
        from unet_ray import console

        # A joined cluster's processes do not inherit this environment: the console settings
        # (console.py) go to them through the job's runtime_env.
        ray.init(runtime_env={"env_vars": console.runtime_env_vars()}, **kwargs)
        progress(f"ray: joined the cluster at {os.environ['RAY_ADDRESS']}")
    else:
        for name, value in ONE_MACHINE_RAY_ENV.items():
            os.environ.setdefault(name, value)
        # Two helpers that cost a 2-core machine CPU while training starts and do nothing here
        # (~1.5 CPU-seconds each, measured): the idle worker processes Ray starts in advance (the
        # training and data tasks of a run cannot use them: Ray Train runs them under its own
        # runtime_env), and Ray Train's watcher for preempted cloud nodes (a local Ray has none).
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        from unet_ray import console

        console.quiet_driver_notices()
        dashboard_port = own_api_server()
        ray.init(
            address="local", _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
            **kwargs,
        )  # fmt: skip
        progress(
            f"ray: started a local Ray on 127.0.0.1 with {ray.cluster_resources().get('CPU', 0):g} CPUs "
            "(token authentication on)"
        )


API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
# The value own_api_server set, copied here: a user's own RAY_API_SERVER_ADDRESS is kept, ours
# (inherited by a command that a process with a local Ray started) is replaced.
OWN_API_SERVER_ENV = "UNET_RAY_OWN_API_SERVER"


def own_api_server() -> int:
    """A free port for the local Ray's dashboard, named in RAY_API_SERVER_ADDRESS before Ray starts,
    so that every process of this Ray inherits it. Ray's helpers that use the state API (Ray Train's
    placement-group cleaner asks it whether the run's controller lives) otherwise look for "the"
    local Ray: with two on the machine they fail ("Found multiple active Ray instances", or an
    AuthenticationError from the other Ray) and cannot clean up after a killed driver."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    current = os.environ.get(API_SERVER_ENV, "")
    if not current or current == os.environ.get(OWN_API_SERVER_ENV):
        os.environ[API_SERVER_ENV] = os.environ[OWN_API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    return port


def _keep_ray_on_loopback() -> None:
    """Make an already imported Ray see RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 too: it reads the
    variable into a constant at import. Measured: set after the import, a local Ray's GCS and
    raylet listened on every interface (0.0.0.0 and ::), not on 127.0.0.1."""
    import sys

    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
        constants.ENABLE_RAY_CLUSTER = False


def root_cause(error: BaseException) -> str:
    seen = error
    while seen.__cause__ is not None and seen.__cause__ is not seen:
        seen = seen.__cause__
    text = str(seen).strip() or type(seen).__name__
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # Ray puts the remote traceback in the message; the last line is the exception itself.
    return lines[-1] if lines else text


def local_gpus() -> int:
    """GPUs a local Ray started on this machine would have, counted without starting it (Ray's own
    detection: CUDA_VISIBLE_DEVICES, else NVML; 0 where there is no NVIDIA driver)."""
    from ray._private.accelerators import get_accelerator_manager_for_resource

    return int(get_accelerator_manager_for_resource("GPU").get_current_node_num_accelerators())


def check_gpus(workers: int, gpu: bool, resources: dict[str, float], per: str = "run") -> None:
    """Refuse a GPU run whose workers cannot all get a GPU: Ray Train would wait for the worker
    group, time out after 60 s and try again without end. `resources`: the cluster's (or, before
    a local Ray starts, {"GPU": local_gpus()}). `per`: "run", or "trial" for a sweep's trials."""
    if not gpu:
        return
    found = int(resources.get("GPU", 0))
    if found == 0:
        raise ConfigError("--gpu: the Ray cluster has no GPUs (0 found); leave out --gpu to train on CPUs")
    if workers > found:
        raise ConfigError(
            f"--gpu --workers {workers}: each {per}'s worker needs a whole GPU and the cluster has {found}; "
            f"use --workers {found} or fewer"
        )


def gpu_notice(gpu: bool, resources: dict[str, float]) -> str | None:
    """A line for a CPU run on a cluster that has GPUs (None otherwise)."""
    found = int(resources.get("GPU", 0))
    if gpu or found == 0:
        return None
    return f"note: the cluster has {found} GPU{'s' if found != 1 else ''} and this run trains on CPUs; add --gpu to use them"
