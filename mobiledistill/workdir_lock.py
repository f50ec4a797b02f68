"""One writer per workdir: `workdir/workdir.lock` names the process that runs the experiment (SPEC §12).

The lock holds the pid, the host name, the process's start time and when it took the lock. A second process on a
workdir in use is refused in one line (CheckpointError: exit 2). A lock left by a process that no longer runs (killed,
or its pid now belongs to another process: the start time differs) on this host is stale and taken over with a
warning; a lock of another host cannot be checked and is refused, naming the file to delete if that run is gone.
Multi-host: process 0 alone holds it. Creation is atomic on local disks (a complete file is hard-linked into place);
on `gs://` it is a best-effort check-then-write.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import sys
import time
import uuid

import jax
from etils import epath

from mobiledistill.checkpoint import CheckpointError

LOCK_NAME = "workdir.lock"
_held: dict[str, int] = {}  # lock path -> nesting depth in this process


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc), or None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped) is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _me() -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "process_start": _start_time(pid),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def stale_reason(holder: dict) -> str | None:
    """Why `holder` (a lock's contents) is stale, or None when it may still be running (or cannot be checked)."""
    if holder.get("host") != socket.gethostname():
        return None
    pid = int(holder.get("pid", -1))
    if pid <= 0 or not _alive(pid):
        return f"pid {pid} is no longer running"
    recorded, now = holder.get("process_start"), _start_time(pid)
    if recorded is not None and now is not None and recorded != now:
        return f"pid {pid} now belongs to another process"
    return None


def _describe(path, holder: dict) -> str:
    return (f"workdir {path.parent} is in use by pid {holder.get('pid')} on host {holder.get('host')} since "
            f"{holder.get('since')} ({path}); wait for that run to finish, use another --workdir, or delete {path} "
            f"if that process is gone")


def _create(path: epath.Path, me: dict) -> bool:
    """Creates the lock with `me` in it; False when a lock already exists."""
    text = json.dumps(me, indent=1) + "\n"
    if "://" in str(path):
        if path.exists():
            return False
        path.write_text(text)
        return True
    tmp = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.write(text)
    try:
        os.link(tmp, str(path))  # atomic, and the file is complete when it appears
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def acquire(workdir: str | epath.Path) -> epath.Path | None:
    """Takes the workdir's lock (process 0 only; re-entrant in one process); returns its path or None."""
    if jax.process_index() != 0:
        return None
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_NAME
    key = str(path)
    if key in _held:
        _held[key] += 1
        return path
    me = _me()
    for _ in range(3):  # a stale lock is moved away, then created anew (another process may win that race)
        if _create(path, me):
            _held[key] = 1
            atexit.register(_release_at_exit, key)
            return path
        try:
            holder = json.loads(path.read_text())
            if not isinstance(holder, dict):
                raise ValueError("not a JSON object")
        except FileNotFoundError:
            continue  # released in between: try again
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"lock file {path} cannot be read ({type(e).__name__}); if no run is using "
                                  f"{workdir}, delete it") from None
        why = stale_reason(holder)
        if why is None:
            raise CheckpointError(_describe(path, holder))
        stale = workdir / f"{LOCK_NAME}.stale-{uuid.uuid4().hex[:8]}"
        try:
            path.rename(stale)  # only one taker succeeds
        except FileNotFoundError:
            continue
        if json.loads(stale.read_text()) != holder:  # another taker replaced it in between: put theirs back
            with contextlib.suppress(FileExistsError):
                _create(path, json.loads(stale.read_text()))
            stale.unlink()
            continue
        stale.unlink()
        print(f"warning: taking over the lock of {workdir} from pid {holder.get('pid')} (started "
              f"{holder.get('since')}): {why}", file=sys.stderr, flush=True)
    raise CheckpointError(f"could not take the lock {path}: other processes keep taking it; is another run "
                          f"starting on {workdir}?")


def release(path: epath.Path | None) -> None:
    """Gives the lock back (it is removed once the outermost holder in this process releases it)."""
    if path is None:
        return
    key = str(path)
    if key not in _held:
        return
    _held[key] -= 1
    if _held[key] > 0:
        return
    del _held[key]
    with contextlib.suppress(FileNotFoundError, ValueError):
        if json.loads(path.read_text()).get("pid") == os.getpid():  # never remove another process's lock
            path.unlink()


def _release_at_exit(key: str) -> None:
    if key in _held:
        _held[key] = 1
        release(epath.Path(key))


@contextlib.contextmanager
def hold(workdir: str | epath.Path):
    """`with hold(workdir):` runs the block as the workdir's one writer."""
    path = acquire(workdir)
    try:
        yield path
    finally:
        release(path)
