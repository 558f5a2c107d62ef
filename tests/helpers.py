"""Process helpers for tests: kill a `unet-ray` command and the local Ray it started; see which
addresses the processes of a Ray listen on; find a free port; a local Ray in the test process."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def session_pids(sid: int) -> list[int]:
    """Every live process of session `sid`. Ray puts each worker in its own process group, so
    killing the driver's group leaves the workers running; the session holds them all."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) == sid:
                with open(f"/proc/{entry}/stat") as f:  # zombies are dead already
                    if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                        pids.append(int(entry))
        except (ProcessLookupError, PermissionError, FileNotFoundError):
            continue
    return pids


def kill_session(sid: int, timeout: float = 30.0) -> None:
    """SIGKILL a whole session (a process started with start_new_session=True and everything it
    started, Ray workers included) and wait, bounded, until none of it runs any more."""
    deadline = time.monotonic() + timeout
    while (pids := session_pids(sid)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    survivors = session_pids(sid)
    assert not survivors, f"processes of session {sid} still alive after {timeout}s: {[_describe(p) for p in survivors]}"


def _describe(pid: int) -> str:
    """'pid state command (parent ppid)' from /proc, for a failure message."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return f"{pid} (gone)"
    command, (state, parent) = stat[stat.index("(") + 1 : stat.rindex(")")], stat.rsplit(")", 1)[1].split()[:2]
    return f"{pid} {state} {command} (parent {parent})"


LOOPBACK_HEX = {  # as /proc/net/tcp{,6} write them
    "0100007F": "127.0.0.1",
    "0000000000000000FFFF00000100007F": "127.0.0.1",  # ::ffff:127.0.0.1, IPv4 on an IPv6 socket
    "00000000000000000000000001000000": "::1",
}


def listening_addresses(pids: list[int]) -> dict[str, int]:
    """Every TCP address that one of `pids` listens on (Linux /proc): address:port -> pid."""
    listening = {}  # socket inode -> "address:port"
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                address, port = fields[1].split(":")
                assert len(address) == width
                readable = LOOPBACK_HEX.get(address, address)
                listening[fields[9]] = f"{readable}:{int(port, 16)}"
    found = {}
    for pid in pids:
        try:
            links = [os.readlink(f) for f in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:  # gone meanwhile
            continue
        for link in links:
            inode = link[len("socket:[") : -1] if link.startswith("socket:[") else None
            if inode in listening:
                found[listening[inode]] = pid
    return found


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (Linux /proc): a local Ray started by this process."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (just now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """`python -m unet_ray.cli ARGS` in its own session, killed with its local Ray at the end."""
    proc = subprocess.Popen([sys.executable, "-m", "unet_ray.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        kill_session(proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@contextlib.contextmanager
def in_process_ray():
    """A local Ray in this process, started as a command starts it (ensure_ray), for the block.
    The environment is as before afterwards: ensure_ray names its Ray's dashboard and settings
    there, and a later test in this process (pytest-xdist runs the modules in any order) would
    hand them to the commands and clusters it starts."""
    import ray

    from unet_ray.raysession import ensure_ray

    before = dict(os.environ)
    ensure_ray()
    try:
        yield
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(before)
