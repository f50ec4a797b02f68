"""Orbax checkpoints per stage, stage completion markers and the workdir's config fingerprint (SPEC §7).

Layout: `workdir/<stage>/checkpoints/<step>/{params,opt_state,data}` (Orbax CheckpointManager, keep-N, async save),
`workdir/<stage>/done.json` once the stage's final checkpoint is committed, and `workdir/config.json` +
`workdir/fingerprint` for the experiment. Paths go through `etils.epath`, so `gs://` workdirs work on TPU VMs.
Multi-host: every process reads, process 0 alone writes the JSON files (then a barrier); each process's data-iterator
state is gathered into the checkpoint, and each takes back its own on restore.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import uuid
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils


class CheckpointError(RuntimeError):
    """Missing/corrupt checkpoints or a workdir that holds another experiment."""


class UnreadableCheckpoint(CheckpointError):
    """One step's checkpoint cannot be read; `why` names the item and the error."""

    def __init__(self, path, why: str):
        super().__init__(f"cannot restore {path}: {why}")
        self.why = why


class WrongProcessCount(CheckpointError):
    """A multi-host checkpoint resumed with another number of processes (not a corrupt checkpoint)."""


def warn(message: str) -> None:
    """One `warning: ...` line on stderr (a recovered problem; the run goes on)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _one_line(e: BaseException, limit: int = 240) -> str:
    """`Type: first line of the message`, cut to `limit` characters (TensorStore errors run to pages)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, KeyError) and e.args:
        text = str(e.args[0])
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _ignore_closed_loop_noise() -> None:
    """After Orbax gives up on a corrupt checkpoint, TensorStore reads still in flight complete on its closed
    asyncio loop (Python prints 'Event loop is closed' tracebacks) and their tasks are collected with exceptions
    nobody retrieved (asyncio logs them at exit): noise after a failure that is reported in one line, filtered out."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    previous = sys.unraisablehook
    if getattr(previous, "_mobiledistill", False):
        return

    def hook(unraisable):
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        previous(unraisable)

    hook._mobiledistill = True
    sys.unraisablehook = hook


def _first_failure(why: str) -> str:
    """`why` if any process failed (the first failure's text), else '': the processes agree on what to restore."""
    if jax.process_count() == 1:
        return why
    return next((w for w in _gather_json(why) if w), "")


def barrier(name: str) -> None:
    """Waits for every process (no-op with one)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _gather_json(obj: Any) -> list:
    """`obj` (JSON-serialisable) of every process, in process order."""
    data = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([data.size], np.int32))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[:data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:int(n)]).decode()) for row, n in zip(gathered, np.asarray(sizes).reshape(-1))]


def read_npz(path: epath.Path, what: str) -> dict[str, np.ndarray]:
    """All arrays of an .npz file (never unpickles); CheckpointError naming the file when it cannot be read."""
    try:
        with epath.Path(path).open("rb") as f, np.load(f, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path} does not exist") from None
    except Exception as e:  # BadZipFile, EOFError, ValueError (object arrays), zlib errors, OSError
        raise CheckpointError(f"cannot read {what} {path}: {_one_line(e, 160)}") from None


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def write_text_atomic(path: epath.Path, text: str) -> None:
    """Writes a temporary file of this process's own and replaces `path` with it (an existing one included): a
    kill leaves the old file or the new one, never a cut one."""
    path = epath.Path(path)
    tmp = path.parent / f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.write_text(text)
    tmp.replace(path)


def write_json_atomic(path: epath.Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


class StageCheckpoints:
    """One stage's Orbax manager: parameters, optimizer state, step and data-iterator state."""

    def __init__(self, stage_dir: str | epath.Path, max_to_keep: int = 2, async_save: bool = True):
        self.dir = epath.Path(stage_dir)
        self.manager = ocp.CheckpointManager(
            self.dir / "checkpoints",
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=async_save),
            item_names=("params", "opt_state", "data"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, data_state: Mapping[str, Any]) -> None:
        data_state = dict(data_state)
        if jax.process_count() > 1:  # Orbax writes JSON from process 0 only: keep every process's position
            data_state = {"per_process": _gather_json(data_state)}
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            data=ocp.args.JsonSave(data_state)), force=True)

    def restore(self, step: int, params_like, opt_state_like, opt_state_fallback=None):
        """Restores into the structure, dtypes and shardings of the given (concrete or abstract) trees.

        `opt_state_fallback`: a function returning (like, convert) for an optimizer state of an older layout
        (`optim.per_leaf_reader`), called when `opt_state_like` does not match: read as `like`, then converted."""
        path = self.dir / "checkpoints" / str(step)
        r = {}
        for item, args in (("params", lambda: ocp.args.StandardRestore(_abstract(params_like))),
                           ("opt_state", lambda: ocp.args.StandardRestore(_abstract(opt_state_like))),
                           ("data", ocp.args.JsonRestore)):
            read = lambda a: getattr(self.manager.restore(step, args=ocp.args.Composite(**{item: a})), item)  # noqa
            try:  # one item at a time, so that the message names the one that cannot be read
                r[item] = read(args())
            except Exception as e:  # orbax raises several types for missing/corrupt/mismatched items
                if item == "opt_state" and opt_state_fallback is not None:
                    try:
                        like, convert = opt_state_fallback()
                        r[item] = convert(read(ocp.args.StandardRestore(like)))
                        continue
                    except Exception:
                        pass
                raise UnreadableCheckpoint(path, f"item {item!r}: {_one_line(e)}") from e
        data = r["data"]
        if "per_process" in data:
            if len(data["per_process"]) != jax.process_count():
                raise WrongProcessCount(f"{path} was saved by {len(data['per_process'])} processes, this run has "
                                        f"{jax.process_count()} (resume with the same number of hosts)")
            data = data["per_process"][jax.process_index()]
        return r["params"], r["opt_state"], data

    def restore_latest(self, params_like, opt_state_like, opt_state_fallback=None):
        """(step, params, opt_state, data state) of the newest readable checkpoint; None when there is none.

        A newer checkpoint that cannot be read (truncated file, bad metadata, missing item) is named in one warning
        line and moved to `<stage>/unreadable_checkpoints/` (kept, not deleted: Orbax would otherwise refuse to save
        that step again). With no readable checkpoint at all, raises CheckpointError and moves nothing.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        problems: list[tuple[int, str]] = []
        _ignore_closed_loop_noise()
        for step in steps:
            try:
                restored, why = self.restore(step, params_like, opt_state_like, opt_state_fallback), ""
            except UnreadableCheckpoint as e:
                restored, why = None, e.why
            why = _first_failure(why)  # every process takes the same step
            if why:
                problems.append((step, why))
                continue
            if problems:
                moved = [f"cannot read checkpoint {self.dir / 'checkpoints' / str(s)} ({w}), moved it to "
                         f"{self._move_aside(s)}" for s, w in problems]
                warn(f"{'; '.join(moved)}; resuming the stage from step {step}")
            return (step, *restored)
        if problems:
            raise CheckpointError(f"no readable checkpoint in {self.dir / 'checkpoints'}: "
                                  + "; ".join(f"step {s}: {w}" for s, w in problems)
                                  + " (nothing was moved or deleted)")
        return None

    def _move_aside(self, step: int) -> epath.Path:
        """Moves an unreadable step out of the manager's directory (process 0; every process then reloads)."""
        src = self.dir / "checkpoints" / str(step)
        dest_dir = self.dir / "unreadable_checkpoints"
        dest = dest_dir / str(step)
        n = 1
        while dest.exists():
            dest, n = dest_dir / f"{step}.{n}", n + 1
        if jax.process_index() == 0:
            dest_dir.mkdir(parents=True, exist_ok=True)
            src.rename(dest)
        barrier(f"unreadable:{src}")
        self.manager.reload()
        return dest

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    # Completion marker ------------------------------------------------------------------------------------------
    def mark_done(self, summary: Mapping[str, Any]) -> None:
        self.wait()
        if jax.process_index() == 0:
            write_json_atomic(self.dir / "done.json", dict(summary))
        barrier(f"done:{self.dir}")


_WARNED: set[str] = set()


def stage_done(stage_dir: str | epath.Path) -> Optional[dict]:
    """The stage's completion summary, or None if it has not finished.

    An unreadable done.json (cut short, not JSON) counts as unfinished, with a warning: re-running the stage from
    its checkpoints gives the same result and writes the marker again.
    """
    path = epath.Path(stage_dir) / "done.json"
    if not path.exists():
        return None
    try:
        done = json.loads(path.read_text())
        if not isinstance(done, dict) or not isinstance(done.get("final_step"), int):
            raise ValueError("no integer final_step")
        return done
    except (ValueError, UnicodeDecodeError) as e:
        if str(path) in _WARNED:  # callers ask more than once per run
            return None
        _WARNED.add(str(path))
        warn(f"{path} cannot be read ({_one_line(e, 120)}): the stage counts as unfinished and is completed again "
             f"from its checkpoints")
        return None


def restore_final_params(stage_dir: str | epath.Path, params_like):
    """The parameters of a finished stage's last checkpoint (the input of the next stage)."""
    stage_dir = epath.Path(stage_dir)
    done = stage_done(stage_dir)
    if done is None:
        raise CheckpointError(f"stage directory {stage_dir} has no finished stage (no done.json)")
    manager = ocp.CheckpointManager(stage_dir / "checkpoints", item_names=("params", "opt_state", "data"))
    remedy = (f"delete {stage_dir / 'done.json'} to complete the stage again from its last readable checkpoint "
              f"(the result is the same)")
    try:
        step = done["final_step"]
        if step not in manager.all_steps():
            raise CheckpointError(f"{stage_dir}: final checkpoint {step} is missing (have {manager.all_steps()}); "
                                  f"{remedy}")
        return manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(params_like)))).params
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot restore parameters from {stage_dir / 'checkpoints' / str(done['final_step'])}"
                              f": {_one_line(e)}; {remedy}") from e
    finally:
        manager.close()


# Config fingerprint ---------------------------------------------------------------------------------------------
# Keys that do not change what is computed: changing them may resume an existing workdir.
VOLATILE_KEYS = ("train.log_every", "train.checkpoint_every", "train.eval_every", "train.progress", "report")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def fingerprint(config: Mapping[str, Any]) -> str:
    flat = {k: v for k, v in _flatten(config).items() if not any(k.startswith(x) for x in VOLATILE_KEYS)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint_matches(workdir: str | epath.Path, config: Mapping[str, Any]) -> bool:
    """Whether the workdir records exactly this experiment (reads only: for readers of a finished workdir)."""
    path = epath.Path(workdir) / "fingerprint"
    try:
        return path.read_text().strip() == fingerprint(config)
    except (FileNotFoundError, OSError, UnicodeDecodeError):
        return False


def check_fingerprint(workdir: str | epath.Path, config: Mapping[str, Any], allow_change: bool = False) -> bool:
    """Records the experiment's config in a new workdir; refuses a workdir that holds a different one.

    Returns True when the workdir already held this experiment (a resume).
    """
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    fp_path, cfg_path = workdir / "fingerprint", workdir / "config.json"
    new = fingerprint(config)
    if fp_path.exists():
        old = fp_path.read_text().strip()
        if old == new:
            return True
        if not allow_change:
            try:
                before = _flatten(json.loads(cfg_path.read_text()))
                after = _flatten(json.loads(json.dumps(dict(config), default=str)))
                missing = object()  # a key one side lacks differs even where the other holds None
                diff = sorted(k for k in set(before) | set(after) if before.get(k, missing) != after.get(k, missing)
                              and not any(k.startswith(x) for x in VOLATILE_KEYS))
                diff = [k if k in before else f"{k} (not recorded in the workdir: a field added since)"
                        for k in diff]
            except Exception:
                diff = ["?"]
            raise CheckpointError(
                f"workdir {workdir} holds another experiment (config differs in {diff[:8]}); use a new --workdir, "
                f"or pass --allow_config_change to resume it with the new config")
    previous = json.loads(cfg_path.read_text()) if fp_path.exists() else None
    barrier(f"fingerprint-read:{workdir}")  # every process has read before process 0 writes
    if jax.process_index() == 0:
        if previous is not None:
            write_json_atomic(workdir / f"config.previous.{old}.json", previous)
        write_json_atomic(cfg_path, json.loads(json.dumps(dict(config), default=str)))
        fp_path.write_text(new + "\n")
    barrier(f"fingerprint-written:{workdir}")
    return False
