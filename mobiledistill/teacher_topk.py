"""Offline teacher for pre-training distillation: the teacher's top-k MLM logits stored once, read every step.

The technique of MaxText's and Tunix's offline distillation. Before a stage with `teacher_top_k = k > 0` trains, its
own batch stream (the stage's seed: the sequences and masks an online stage would see first) runs through the
frozen teacher for `teacher_topk_epochs` passes over the training corpus; for every masked position the k largest
teacher logits and their vocabulary ids are stored with the batch, one `.npz` per batch and process under
`<stage>/teacher_topk/`. The stage then cycles through the stored batches and never runs the teacher: the student
sees that many fixed maskings of the corpus (static masking, as BERT's `dupe_factor`), and its soft target is the
teacher's softmax renormalised over the top k (`losses.distill.mlm_distill_loss`; the mass outside is dropped and
reported as `top_k_mass`). Building is resumable (a kill keeps every whole batch file), and a finished cache is
marked by `meta.json`, which also says what it was built for: a later run with other settings is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from mobiledistill import checkpoint as ckpt
from mobiledistill import sharding, steps
from mobiledistill.data.errors import DataError
from mobiledistill.data.iterators import to_global
from mobiledistill.strategies.stage import TOPK_TERMS, Stage, term_kind

CACHE_DIR = "teacher_topk"
VERSION = 1
# Per-file entries that are not batch arrays.
_BOOKKEEPING = ("iterator_state", "mass_sum", "weight_sum")


class CacheMismatch(ValueError):
    """A finished top-k cache was built for other settings than the stage now asks for."""


def offline_stage(stage: Stage) -> Stage:
    """The stage whose teacher terms read the stored top-k logits from the batch (`batch_teacher` terms)."""
    losses = {name: ({"loss": "batch_teacher", "inner": term_kind(name, spec),
                      **{k: v for k, v in dict(spec).items() if k not in ("loss", "inner")}}
                     if term_kind(name, spec) in TOPK_TERMS else spec)
              for name, spec in stage.losses.items()}
    return dataclasses.replace(stage, losses=losses)


def _temperature(stage: Stage) -> float:
    return next((float(dict(spec).get("temperature", 1.0)) for name, spec in stage.losses.items()
                 if term_kind(name, spec) in TOPK_TERMS), 1.0)


def make_topk_fn(stage: Stage, teacher_graphdef, k: int):
    """`fn(teacher_params, batch) -> (values [B, P, k] f32, ids [B, P, k] int32, sum of weighted top-k mass, sum of
    weights)`: the teacher's k largest MLM logits and the share of its softmax (at the stage's temperature) they hold."""
    temperature = _temperature(stage)

    def fn(teacher_params, batch):
        teacher = nnx.merge(teacher_graphdef, teacher_params)
        logits = steps.forward(teacher, batch, num_layers=stage.teacher_num_layers)["mlm_logits"].astype(jnp.float32)
        if not 1 <= k <= logits.shape[-1]:
            raise ValueError(f"pd.teacher_top_k={k}; valid: 1 to the teacher's vocabulary size {logits.shape[-1]}")
        values, ids = jax.lax.top_k(logits, k)
        mass = jnp.exp(jax.nn.logsumexp(values / temperature, -1) - jax.nn.logsumexp(logits / temperature, -1))
        w = batch["masked_lm_weights"].astype(jnp.float32)
        return values, ids.astype(jnp.int32), jnp.sum(mass * w), jnp.sum(w)

    return fn


def _host_local(x: jax.Array, mesh) -> np.ndarray:
    """This process's rows of a batch-sharded global array."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, sharding.batch_sharding(mesh).spec))


class TopKBatches:
    """Cycles through the stored batches (with their `teacher_mlm_topk_*` arrays), resumable like the data iterator."""

    def __init__(self, directory: epath.Path, count: int, batch_sharding=None):
        self.directory, self.count, self.sharding = epath.Path(directory), int(count), batch_sharding
        self.position = 0

    def path(self, index: int) -> epath.Path:
        return self.directory / f"p{jax.process_index():04d}-{index:07d}.npz"

    def next_numpy(self) -> dict[str, np.ndarray]:
        arrays = ckpt.read_npz(self.path(self.position % self.count), "offline-teacher batch")
        self.position += 1
        return {k: v for k, v in arrays.items() if k not in _BOOKKEEPING}

    def __next__(self) -> dict[str, Any]:
        batch = self.next_numpy()
        return to_global(batch, self.sharding) if self.sharding is not None else batch

    def __iter__(self):
        return self

    def get_state(self) -> dict[str, Any]:
        return {"kind": "teacher_topk", "version": VERSION, "position": self.position, "batches": self.count}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("kind") != "teacher_topk" or int(state.get("batches", -1)) != self.count:
            raise DataError(f"the stage's checkpoint was saved reading {state.get('kind')!r} batches "
                            f"({state.get('batches', '?')} of them), this run reads {self.count} stored offline-"
                            f"teacher batches: keep pd.teacher_top_k / teacher_topk_epochs as the stage began")
        self.position = int(state["position"])


def signature(stage: Stage, data) -> dict[str, Any]:
    """What a cache is valid for: the teacher, k, the epochs, and the batch stream (seed, batch, corpora, shapes)."""
    return dict(version=VERSION, teacher=stage.teacher_from, teacher_num_layers=stage.teacher_num_layers,
                top_k=stage.teacher_top_k, epochs=stage.teacher_topk_epochs, temperature=_temperature(stage),
                seed=data.seed, local_batch=data.local_batch_size, process_count=jax.process_count(),
                corpora=data.get_state()["corpora"], data=dataclasses.asdict(data.config))


def prepare(stage_dir: epath.Path, stage: Stage, teacher, data, mesh, label: str = "") -> TopKBatches:
    """The stage's stored batches, built first if needed (resuming a killed build). `teacher` is (graphdef, params);
    `data` is the stage's fresh PretrainingIterator. Returns the iterator the stage trains on."""
    directory = epath.Path(stage_dir) / CACHE_DIR
    directory.mkdir(parents=True, exist_ok=True)
    meta_path = directory / "meta.json"
    want = json.loads(json.dumps(signature(stage, data)))  # as meta.json holds it (lists, not tuples)
    batch_sharding = sharding.batch_sharding(mesh)
    reader = TopKBatches(directory, 0, batch_sharding)
    if meta_path.exists():
        meta = _read_meta(meta_path)
        if meta.get("signature") != want:
            diff = sorted(k for k in set(want) | set(meta.get("signature", {}))
                          if want.get(k) != meta.get("signature", {}).get(k))
            raise CacheMismatch(f"{directory} was built for other settings ({', '.join(diff)} differ); keep them "
                                f"as they were, or move that directory and the stage's checkpoints away to rebuild")
        reader.count = int(meta["batches"])
        return reader

    start, mass, weight, read = _resume_point(reader, data)
    fn = jax.jit(make_topk_fn(stage, teacher[0], stage.teacher_top_k))
    per_epoch = data.documents_per_epoch()
    goal = max(1, math.ceil(stage.teacher_topk_epochs * per_epoch))
    t0, index, primary = time.perf_counter(), start, jax.process_index() == 0
    if primary:
        print(f"{label} offline teacher: storing its top {stage.teacher_top_k} MLM logits for "
              f"{stage.teacher_topk_epochs} pass(es) over the corpus ({goal} documents per process)"
              + (f", resuming at batch {start}" if start else ""), flush=True)
    done = start > 0 and _agree(read >= goal)
    while not done:
        batch = data.next_numpy()
        values, ids, m, w = fn(teacher[1], to_global(batch, batch_sharding))
        mass, weight = mass + float(m), weight + float(w)
        state = data.get_state()
        _write_batch(reader.path(index), dict(
            batch, teacher_mlm_topk_values=_host_local(values, mesh), teacher_mlm_topk_indices=_host_local(ids, mesh),
            iterator_state=np.array(json.dumps(state)), mass_sum=np.float64(mass), weight_sum=np.float64(weight)))
        index += 1
        done = bool(_agree(state["doc_step"] >= goal))
        if primary and (done or index % 50 == 0):
            rate = (index - start) / max(time.perf_counter() - t0, 1e-9)
            left = (goal - state["doc_step"]) / max(state["doc_step"] / index, 1e-9) / rate
            print(f"{label} offline teacher: batch {index}, {state['doc_step'] / per_epoch:.2f} epochs, "
                  f"{rate:.2f} batches/s, top-{stage.teacher_top_k} mass {mass / max(weight, 1.0):.4f}"
                  + ("" if done else f", ETA {max(left, 0.0):.0f} s"), flush=True)
    ckpt.barrier("teacher_topk_built")
    size = sum(p.stat().length for p in directory.glob(f"p{jax.process_index():04d}-*.npz"))
    if primary:
        ckpt.write_json_atomic(meta_path, dict(
            signature=want, batches=index, epochs_read=data.get_state()["doc_step"] / per_epoch,
            top_k_mass=mass / max(weight, 1.0), bytes_process0=size, build_seconds=time.perf_counter() - t0))
    ckpt.barrier("teacher_topk_meta")
    reader.count = index
    return reader


def _agree(flag: bool) -> bool:
    """Process 0's flag on every process (they stop building at the same batch)."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.broadcast_one_to_all(np.array(flag)))


def _write_batch(path: epath.Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.parent / f".{path.name}.partial"
    with tmp.open("wb") as f:
        np.savez(f, **arrays)
    tmp.replace(path)


def _read_meta(path: epath.Path) -> dict:
    try:
        meta = json.loads(path.read_text())
        int(meta["batches"])
        return meta
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ckpt.CheckpointError(f"cannot read {path} ({type(e).__name__}); move it away to rebuild the "
                                   f"offline-teacher cache") from None


def _resume_point(reader: TopKBatches, data) -> tuple[int, float, float, int]:
    """(batches already stored, their mass and weight sums, documents read), the iterator moved past them. Stored
    files are read from the first on; the first unreadable one (a kill mid-write) and everything after it are built
    again."""
    count = 0
    while reader.path(count).exists():
        count += 1
    while count > 0:
        try:
            last = ckpt.read_npz(reader.path(count - 1), "offline-teacher batch")
            state = json.loads(str(last["iterator_state"]))
            break
        except (ckpt.CheckpointError, KeyError, ValueError) as e:
            print(f"warning: {e}; building it again", flush=True)
            count -= 1
    if jax.process_count() > 1:
        count = min(multihost_utils.process_allgather(np.array(count)).reshape(-1).tolist())
        if count:
            last = ckpt.read_npz(reader.path(count - 1), "offline-teacher batch")
            state = json.loads(str(last["iterator_state"]))
    if count == 0:
        return 0, 0.0, 0.0, 0
    data.set_state(state)
    return count, float(last["mass_sum"]), float(last["weight_sum"]), int(state["doc_step"])
