"""Process helpers for tests that kill a `unet-ray` command and the local Ray it started."""

from __future__ import annotations

import os
import signal
import time


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
    assert not session_pids(sid), f"processes of session {sid} still alive after {timeout}s"
