"""A local Ray cluster on 127.0.0.1 for trying `ray job submit`: `unet-ray cluster up|down|status`.

Each node is one `ray start --block` process in a session of its own. Every port binds to
loopback, token authentication is on, and the cluster is named by its temp dir, where its state
file and logs live. Stopping a cluster sends SIGTERM to its `ray start` processes (Ray's handler
stops that node's GCS, raylet, dashboard and workers), then kills whatever is left that carries
the cluster's marker in its environment: `down` never touches other Ray instances on the machine.

Only the standard library is imported at module level; Ray runs in the child processes.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from unet_ray.raysession import API_SERVER_ENV, OWN_API_SERVER_ENV

DEFAULT_TEMP_DIR = "/tmp/unet_ray_cluster"  # short: Ray's unix socket paths must stay < 108 bytes
STATE_FILE = "unet_ray_cluster.json"
MARKER_ENV = "UNET_RAY_LOCAL_CLUSTER"  # set to the temp dir in every process of the cluster
DEFAULT_TOKEN_PATH = Path.home() / ".ray" / "auth_token"
STARTED_LINE = "Ray runtime started"  # what `ray start` prints once its node is up
# "0" puts Ray in single-machine mode: every process (node, driver, client) takes 127.0.0.1 as its
# own address and keeps 127.0.0.1 in RAY_ADDRESS, instead of the machine's network address.
LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
SLOW_START_LINE = "timed out during startup"  # `ray start`: the raylet missed Ray's start-up window
START_ATTEMPTS = 2
WORKER_PORTS = range(10002, 20000)  # `ray start`'s default --min/--max-worker-port


class ClusterError(RuntimeError):
    """A local cluster that could not be started, found or stopped; the message says why."""


@dataclass
class LocalCluster:
    temp_dir: str
    port: int
    dashboard_port: int
    token_path: str
    pids: list[int] = field(default_factory=list)  # `ray start --block` processes, head first
    logs: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        """What RAY_ADDRESS (and `ray.init`) takes."""
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """What `ray job submit --address` takes."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def state_file(self) -> Path:
        return Path(self.temp_dir) / STATE_FILE

    def save(self) -> None:
        self.state_file.write_text(json.dumps(asdict(self), indent=2))


# ---------------------------------------------------------------------------------------------
# Token and environments
# ---------------------------------------------------------------------------------------------


def ensure_token(token_path: str | os.PathLike | None = None) -> Path:
    """The token file the cluster uses (given, else $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token),
    written owner-only when missing, as `ray get-auth-token --generate` does."""
    path = Path(token_path or os.environ.get("RAY_AUTH_TOKEN_PATH") or DEFAULT_TOKEN_PATH).expanduser().resolve()
    if path.is_file() and path.read_text().strip():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def client_env(cluster: LocalCluster, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Ray clients of `cluster` (`ray job submit`, `ray status`, `ray.init`).

    A client sends the token only when RAY_AUTH_MODE=token is set in its own environment.
    RAY_AUTH_TOKEN would win over the token file, so a stray one is dropped.
    """
    env = dict(os.environ if base is None else base)
    env.pop("RAY_AUTH_TOKEN", None)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=cluster.token_path)
    # Otherwise a client turns RAY_ADDRESS=127.0.0.1:PORT into the machine's network address,
    # where nothing listens (see _START_EXTRA_NODE).
    env[LOOPBACK_ONLY_ENV] = "0"
    # The dashboard of a local Ray that this process started earlier (raysession.own_api_server
    # names it for Ray's state-API helpers): a client or node of this cluster would ask that one
    # (measured: `ray job submit --address <this cluster>` then failed to connect). A user's own
    # value is kept.
    if env.get(API_SERVER_ENV) and env.get(API_SERVER_ENV) == env.get(OWN_API_SERVER_ENV):
        del env[API_SERVER_ENV], env[OWN_API_SERVER_ENV]
    return env


def _node_env(cluster: LocalCluster, head: bool) -> dict[str, str]:
    env = client_env(cluster)
    env.pop("RAY_ADDRESS", None)  # a node must not try to join some other cluster
    env.update({"RAY_USAGE_STATS_ENABLED": "0", MARKER_ENV: cluster.temp_dir})
    # On SIGTERM a node first drains (waits for Serve replicas to move) for up to 30 s; nothing
    # here needs that, and `down` should take seconds.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    if not head:
        # Ray's single-machine mode (set by client_env) refuses to start a second node; extra
        # nodes join the head's 127.0.0.1 with --node-ip-address=127.0.0.1 and stay on loopback.
        env.pop(LOOPBACK_ONLY_ENV)
    from unet_ray.raysession import ONE_MACHINE_RAY_ENV

    # This cluster's nodes share one machine, as a local Ray's processes do; a job's driver
    # inherits these from its node, and Ray Train passes the poll interval on to its controller.
    for name, value in ONE_MACHINE_RAY_ENV.items():
        env.setdefault(name, value)
    # Ray Train's placement-group cleaner (a detached actor on the head) asks the state API about
    # its controller; without an address it looks for "the" local Ray and, with another Ray on the
    # machine, fails (raysession.own_api_server).
    env["RAY_API_SERVER_ADDRESS"] = cluster.dashboard_url
    return env


# ---------------------------------------------------------------------------------------------
# Start
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


# `ray start` for a second node on the same machine. Ray turns a head address of 127.0.0.1 into
# the machine's network address (right for real clusters, where other machines must reach it), and
# Ray's single-machine mode, which keeps loopback, refuses to start a second node. So the extra
# nodes run Ray's own `ray start` with that one rewrite switched off: they join 127.0.0.1 as given.
_START_EXTRA_NODE = """
import sys
import ray._private.services as services
services.resolve_ip_for_localhost = lambda host: host
from ray.scripts.scripts import main
sys.argv[0] = "ray"
sys.exit(main())
"""


def _node_command(cluster: LocalCluster, head: bool, num_cpus: int | None, object_store_mb: int | None) -> list[str]:
    launcher = ["-m", "ray.scripts.scripts"] if head else ["-c", _START_EXTRA_NODE]
    cmd = [
        sys.executable, *launcher, "start", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={cluster.temp_dir}",
        # Ports Ray would otherwise share between nodes of one machine (e.g. the agent's 52365).
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]  # fmt: skip
    if head:
        cmd += [
            "--head", f"--port={cluster.port}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={cluster.dashboard_port}",
            f"--ray-client-server-port={free_port()}",
        ]  # fmt: skip
    else:
        cmd += [f"--address={cluster.address}"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if object_store_mb is not None:
        cmd.append(f"--object-store-memory={object_store_mb * 1024 * 1024}")
    return cmd


def _wait_started(proc: subprocess.Popen, log: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        if log.is_file() and STARTED_LINE in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise ClusterError(f"`ray start` exited with code {proc.returncode}; its log {log} ends:\n{_tail(log)}")
        time.sleep(0.5)
    raise ClusterError(f"`ray start` did not report the node up in time; its log {log} ends:\n{_tail(log)}")


def _tail(path: Path, lines: int = 8) -> str:
    text = path.read_text(errors="replace") if path.is_file() else "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _get(url: str, token: str | None = None, timeout: float = 5.0) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def state(cluster: LocalCluster, resource: str, **filters: str) -> list[dict]:
    """Rows of Ray's state API (`nodes`, `actors`, `jobs`, ...) for `cluster`, with `key=value`
    filters, read from its dashboard with the cluster's token."""
    query = {"limit": "1000", "detail": "true"}
    for key, value in filters.items():
        query.setdefault("filter_keys", []).append(key)
        query.setdefault("filter_predicates", []).append("=")
        query.setdefault("filter_values", []).append(value)
    url = f"{cluster.dashboard_url}/api/v0/{resource}?{urllib.parse.urlencode(query, doseq=True)}"
    status, body = _get(url, Path(cluster.token_path).read_text().strip())
    if status != 200:
        raise ClusterError(f"{url} answered {status}: {body[:200]}")
    return json.loads(body)["data"]["result"]["result"]


def alive_nodes(cluster: LocalCluster) -> list[dict]:
    return state(cluster, "nodes", state="ALIVE")


def _wait_ready(cluster: LocalCluster, nodes: int, deadline: float) -> None:
    """Dashboard up and every node registered (job submission needs both)."""
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            if _get(f"{cluster.dashboard_url}/api/gcs_healthz")[0] == 200:
                count = len(alive_nodes(cluster))
                if count >= nodes:
                    return
                last = f"{count} of {nodes} nodes alive"
        except (OSError, ClusterError, ValueError, KeyError) as e:
            last = str(e)
        time.sleep(0.5)
    raise ClusterError(f"cluster in {cluster.temp_dir} not ready in time ({last})")


def start(
    temp_dir: str | os.PathLike = DEFAULT_TEMP_DIR,
    port: int = 6379,
    dashboard_port: int = 8265,
    num_cpus: int | None = None,
    worker_nodes: int = 0,
    token_path: str | os.PathLike | None = None,
    object_store_mb: int | None = None,
    timeout: float = 120.0,
) -> LocalCluster:
    """Start a head (plus `worker_nodes` more nodes, each with `num_cpus`) on 127.0.0.1.

    Returns once the dashboard answers and every node is registered (each try within `timeout`
    seconds); on any failure the nodes already started are stopped again.
    """
    temp_dir = str(Path(temp_dir).expanduser().resolve())
    existing = find(temp_dir)
    if existing is not None and is_running(existing):
        raise ClusterError(f"a cluster from {temp_dir} is already running ({existing.address}); stop it first")
    for p in (port, dashboard_port):
        if p in WORKER_PORTS:
            raise ClusterError(
                f"port {p} is in Ray's worker port range {WORKER_PORTS.start}-{WORKER_PORTS.stop - 1}; "
                "choose another with --port/--dashboard-port"
            )
        if _port_in_use(p):
            raise ClusterError(f"port {p} on 127.0.0.1 is already in use; choose another with --port/--dashboard-port")
    Path(temp_dir).mkdir(parents=True, exist_ok=True)
    token = str(ensure_token(token_path))

    def start_once() -> LocalCluster:
        cluster = LocalCluster(temp_dir, port, dashboard_port, token)
        _start_nodes(cluster, num_cpus, worker_nodes, object_store_mb, time.monotonic() + timeout)
        return cluster

    for _ in range(START_ATTEMPTS - 1):
        try:
            return start_once()
        except ClusterError as e:
            # The raylet gives its dashboard agent ~15 s to start and the node 30 s to register,
            # neither configurable in Ray 2.60; on a busy machine the agent's imports can take
            # longer. The next try starts from a warm page cache.
            if SLOW_START_LINE not in str(e):
                raise
    return start_once()


def _start_nodes(
    cluster: LocalCluster, num_cpus: int | None, worker_nodes: int, object_store_mb: int | None, deadline: float
) -> None:
    """Start the head and the extra nodes one after the other; on failure stop what started."""
    try:
        for index in range(worker_nodes + 1):
            _start_node(cluster, index == 0, num_cpus, object_store_mb, deadline)
        _wait_ready(cluster, worker_nodes + 1, deadline)
    except BaseException:
        stop(cluster)
        raise


def _start_node(
    cluster: LocalCluster, head: bool, num_cpus: int | None, object_store_mb: int | None, deadline: float
) -> None:
    """One `ray start --block` in a session of its own (the node's raylet and workers are in it
    too: kill_node), recorded in the state file; returns once it reports the node up."""
    index = len(cluster.pids)
    role = "head" if head else f"node{index}"
    log = Path(cluster.temp_dir) / f"ray_start_{role}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            _node_command(cluster, head, num_cpus, object_store_mb),
            env=_node_env(cluster, head=head),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # not killed with the terminal or test that started it
        )
    cluster.pids.append(proc.pid)
    cluster.logs.append(str(log))
    cluster.save()
    _wait_started(proc, log, deadline)


def add_node(
    cluster: LocalCluster, num_cpus: int | None = None, object_store_mb: int | None = None, timeout: float = 120.0
) -> int:
    """Join one more node to a running `cluster` (a machine that comes up while a run goes on);
    returns its index in cluster.pids once the cluster counts it alive. A node that fails to start
    is stopped again; the rest of the cluster is left as it is."""
    deadline = time.monotonic() + timeout
    alive = len(alive_nodes(cluster))
    index = len(cluster.pids)
    try:
        _start_node(cluster, False, num_cpus, object_store_mb, deadline)
        _wait_ready(cluster, alive + 1, deadline)
    except BaseException:
        if len(cluster.pids) > index:
            kill_node(cluster, index)
        raise
    return index


def node_pids(cluster: LocalCluster, index: int) -> list[int]:
    """Every live process of node `index` (0: the head): its `ray start` started them all in its
    own session (raylet, agents, workers; Ray puts workers in process groups of their own, but
    they stay in the session)."""
    sid = cluster.pids[index]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) == sid and _alive(int(entry.name)):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile
            continue
    return found


def kill_node(cluster: LocalCluster, index: int, timeout: float = 30.0) -> list[int]:
    """SIGKILL every process of node `index` at once, raylet included: the node is lost, as when
    its machine dies (no drain, no goodbye to the head). Returns the pids killed; raises a
    ClusterError if any still runs after `timeout` seconds."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while (pids := node_pids(cluster, index)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        for pid in pids:
            _reap(pid)
        time.sleep(0.1)
    left = node_pids(cluster, index)
    if left:
        raise ClusterError(f"processes {left} of node {index} of the cluster in {cluster.temp_dir} did not exit")
    return sorted(killed)


# ---------------------------------------------------------------------------------------------
# Find, status, stop
# ---------------------------------------------------------------------------------------------


def find(temp_dir: str | os.PathLike = DEFAULT_TEMP_DIR) -> LocalCluster | None:
    state = Path(temp_dir).expanduser().resolve() / STATE_FILE
    if not state.is_file():
        return None
    return LocalCluster(**json.loads(state.read_text()))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A child that exited but was not reaped yet (we started it in this process) is not alive.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def is_running(cluster: LocalCluster) -> bool:
    return any(_alive(pid) for pid in cluster.pids)


def _marked_pids(temp_dir: str) -> list[int]:
    """Processes whose environment carries this cluster's marker (Linux /proc)."""
    marker = f"{MARKER_ENV}={temp_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return [pid for pid in found if _alive(pid)]


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for pid in pids:
            _reap(pid)
        pids = [pid for pid in pids if _alive(pid)]
        if not pids:
            break
        time.sleep(0.2)
    return pids


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child: init reaps it
        pass


def stop(cluster: LocalCluster, timeout: float = 30.0) -> None:
    """Stop every process of `cluster` (worker nodes first, then the head), and only those."""
    for pid in reversed(cluster.pids):
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)
    left = _wait_gone(list(cluster.pids), timeout)
    left += _marked_pids(cluster.temp_dir)
    for pid in set(left):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    left = _wait_gone(list(set(left)), 10.0)
    if left:
        raise ClusterError(f"processes {left} of the cluster in {cluster.temp_dir} did not exit")


def _down_command(cluster: LocalCluster) -> str:
    default = cluster.temp_dir == str(Path(DEFAULT_TEMP_DIR).resolve())
    return "unet-ray cluster down" + ("" if default else f" --temp-dir {shlex.quote(cluster.temp_dir)}")


def submit_hint(cluster: LocalCluster) -> str:
    """What `unet-ray cluster up` prints: the addresses and the exact commands to use them."""
    auth = "RAY_AUTH_MODE=token"  # a Ray client sends the token only in token mode
    if Path(cluster.token_path) != DEFAULT_TOKEN_PATH.resolve():
        auth += f" RAY_AUTH_TOKEN_PATH={shlex.quote(cluster.token_path)}"
    return "\n".join(
        [
            f"Ray cluster up on 127.0.0.1: {len(cluster.pids)} node(s), token authentication on",
            f"  RAY_ADDRESS={cluster.address}  (a driver run by hand here needs {auth} {LOOPBACK_ONLY_ENV}=0 too)",
            f"  dashboard   {cluster.dashboard_url}  (log in with the token: ray get-auth-token)",
            f"  token       {cluster.token_path}",
            f"  logs        {cluster.temp_dir}/session_latest/logs",
            "Submit a training job from the repository root:",
            f"  {auth} ray job submit --address {cluster.dashboard_url} --working-dir . "
            "--runtime-env cluster/runtime_env.yaml -- unet-ray train --storage-path /tmp/unet_ray_results --name demo",
            f"Stop it: {_down_command(cluster)}",
        ]
    )


def status_text(temp_dir: str | os.PathLike = DEFAULT_TEMP_DIR) -> str:
    cluster = find(temp_dir)
    if cluster is None:
        return f"no cluster was started from {Path(temp_dir).expanduser()}"
    running = [pid for pid in cluster.pids if _alive(pid)]
    lines = [
        f"cluster from {cluster.temp_dir}: {len(running)} of {len(cluster.pids)} node processes running",
        f"  RAY_ADDRESS={cluster.address}  dashboard {cluster.dashboard_url}  token {cluster.token_path}",
    ]
    if running:
        try:
            nodes = alive_nodes(cluster)
            cpus = sum(n.get("resources_total", {}).get("CPU", 0) for n in nodes)
            gpus = sum(n.get("resources_total", {}).get("GPU", 0) for n in nodes)
            lines.append(f"  {len(nodes)} node(s) alive: {cpus:g} CPUs, {gpus:g} GPUs")
        except (OSError, ClusterError, ValueError, KeyError) as e:
            lines.append(f"  the dashboard does not answer: {e}")
    return "\n".join(lines)


def down(temp_dir: str | os.PathLike = DEFAULT_TEMP_DIR) -> str:
    """Stop the cluster started from `temp_dir`; its logs stay there."""
    cluster = find(temp_dir)
    if cluster is None:
        raise ClusterError(f"no cluster was started from {Path(temp_dir).expanduser()} (nothing to stop)")
    was_running = is_running(cluster) or bool(_marked_pids(cluster.temp_dir))
    stop(cluster)
    if not was_running:
        return f"the cluster from {cluster.temp_dir} was not running"
    return f"stopped the cluster from {cluster.temp_dir} (logs kept in {cluster.temp_dir}/session_latest/logs)"
