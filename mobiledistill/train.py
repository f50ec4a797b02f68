"""The generic stage runner: parameters on the mesh, the jitted step, the loop, checkpoints, preemption, evaluation.

Resuming is exact: the step's dropout key is derived from (seed, stage, step), and the data iterator's position is
saved in every checkpoint, so a run killed at any point and re-run produces the same parameters as one that was not.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from mobiledistill import checkpoint as ckpt
from mobiledistill import convert, optim, perf, sharding, steps, teacher_topk
from mobiledistill.data import PretrainingConfig, PretrainingIterator
from mobiledistill.metrics import StageMetrics
from mobiledistill.models import EncoderConfig, PreTrainingModel
from mobiledistill.strategies import Stage, init_from_teacher, projection

# Fault injection for the resume tests: MOBILEDISTILL_FAULT=kill:<stage>:<step> SIGKILLs the process after that step.
FAULT_ENV = "MOBILEDISTILL_FAULT"


class NonFiniteLoss(RuntimeError):
    """The loss or gradients became NaN/Inf; the stage stops and its last good checkpoint is kept."""


class Preempted(RuntimeError):
    """SIGTERM: the current step was checkpointed; re-running the same command continues."""


class SigtermFlag:
    """Installed while a pipeline runs: SIGTERM sets a flag that the loop checks after every step."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)


@dataclasses.dataclass
class RunContext:
    """What every stage of a pipeline shares."""

    workdir: epath.Path
    config: Any  # ml_collections.ConfigDict
    mesh: Mesh
    teacher_cfg: EncoderConfig
    student_cfg: EncoderConfig
    tokenizer: Any
    train_corpus: Any
    heldout_corpus: Any
    peak_flops: float
    sigterm: SigtermFlag
    _teacher_cache: dict = dataclasses.field(default_factory=dict)

    @property
    def data_config(self) -> PretrainingConfig:
        d = self.config.data
        return PretrainingConfig(max_seq_length=d.max_seq_length, max_predictions_per_seq=d.max_predictions_per_seq,
                                 whole_word_masking=d.whole_word_masking)

    def stage_seed(self, stage: Stage) -> int:
        return (self.config.seed * 1_000_003 + zlib.crc32(stage.name.encode())) % (2 ** 31)


@functools.lru_cache(maxsize=8)
def abstract_model(cfg: EncoderConfig):
    """(graphdef, abstract parameter state) without allocating (cached: callers must not mutate it)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: PreTrainingModel(cfg, nnx.Rngs(0))))
    return graphdef, state


def init_params(cfg: EncoderConfig, seed: int, shardings):
    """Random parameters created directly on the mesh."""
    return jax.jit(lambda: nnx.state(PreTrainingModel(cfg, nnx.Rngs(seed)), nnx.Param),
                   out_shardings=shardings)()


def _with_shardings(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def load_teacher(ctx: RunContext, source: str):
    """(graphdef, parameters on the mesh) of the frozen teacher: a finished stage of this pipeline or 'hf:<dir>'."""
    if source in ctx._teacher_cache:
        return ctx._teacher_cache[source]
    graphdef, abstract = abstract_model(ctx.teacher_cfg)
    shardings = sharding.tree_shardings(abstract, ctx.mesh)
    if source.startswith("hf:"):
        model, fresh = convert.load_hf_pretraining(source[3:], seed=ctx.config.seed, dtype=ctx.teacher_cfg.dtype)
        if fresh and jax.process_index() == 0:
            print(f"teacher {source}: encoder from the checkpoint; it has no {' / '.join(n.upper() for n in fresh)} "
                  f"head: freshly initialised (seed {ctx.config.seed})", flush=True)
        same = dict(dtype=ctx.teacher_cfg.dtype, scan_layers=ctx.teacher_cfg.scan_layers, remat=ctx.teacher_cfg.remat)
        if model.encoder.cfg.replace(**same) != ctx.teacher_cfg:
            raise convert.ConversionError(f"teacher checkpoint {source[3:]} does not match the configured teacher "
                                          f"model; set teacher.preset/fields to its config.json")
        params = jax.device_put(nnx.state(model, nnx.Param), shardings)  # the same paths scanned or not
    else:
        params = ckpt.restore_final_params(ctx.workdir / source, _with_shardings(abstract, shardings))
        params = _as_state(abstract, params)
    ctx._teacher_cache[source] = (graphdef, params)
    return graphdef, params


def _as_state(abstract: nnx.State, pure) -> nnx.State:
    """Orbax restores plain nested dicts; put them back into the model's State structure."""
    if isinstance(pure, nnx.State):
        return pure
    state = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(state, pure)
    return state


def initial_params(ctx: RunContext, stage: Stage, cfg: EncoderConfig, abstract, shardings):
    """(parameters, report of the teacher initialisation or None). `abstract` / `shardings` are the stage's trees:
    the student's plus fresh width projections when the stage has them (a finished stage hands on the student
    alone)."""
    s_abstract, s_shard = projection.drop(abstract), projection.drop(shardings)
    report = None
    if stage.init == "previous":
        restored = ckpt.restore_final_params(ctx.workdir / stage.init_from, _with_shardings(s_abstract, s_shard))
        params = _as_state(s_abstract, restored)
    elif stage.init == "checkpoint":  # a copy: the stage's parameters are donated, the cached teacher's must not be
        _, loaded = load_teacher(ctx, stage.init_from)
        params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=s_shard)(loaded)
        ctx._teacher_cache.pop(stage.init_from, None)  # later stages read this stage's result instead
    else:
        params = init_params(cfg, ctx.stage_seed(stage), s_shard)
        if stage.init == "teacher_copy":
            _, teacher = load_teacher(ctx, stage.teacher_from)
            params, report = init_from_teacher(params, teacher, cfg, ctx.teacher_cfg)
            params = jax.device_put(params, s_shard)
    if stage.projections:
        fresh = projection.init_projections(stage.projections, cfg.hidden_size, ctx.teacher_cfg.hidden_size,
                                            ctx.stage_seed(stage))
        params = jax.device_put(projection.attach(params, fresh), shardings)
    return params, report


def _read_init_report(stage_dir) -> dict | None:
    path = stage_dir / "init_from_teacher.json"
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except (OSError, ValueError):
        return None


def _finite(metrics: dict) -> bool:
    return all(math.isfinite(float(v)) for k, v in metrics.items())


def log_metrics(log, step: int, metrics, nonfinite: str, what: str, last_good: int | None, hint: str) -> None:
    """Logs one step's metrics on the host; with `nonfinite='stop'` a non-finite value raises NonFiniteLoss."""
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not _finite(host) and nonfinite == "stop":
        raise NonFiniteLoss(f"{what}: non-finite loss/gradients at step {step} ({host}); kept the last good "
                            f"checkpoint (step {last_good}); {hint} or set --config.train.nonfinite=skip")
    log.log(step, host)


def save_or_preempt(checkpoints, step: int, params, opt_state, data, save: bool, sigterm, what: str) -> bool:
    """Checkpoints when `save` or on SIGTERM and says whether it did; after a SIGTERM save, raises Preempted."""
    if not (save or sigterm.raised):
        return False
    checkpoints.save(step, params, opt_state, data.get_state())
    if sigterm.raised:
        checkpoints.wait()
        raise Preempted(f"SIGTERM: {what} checkpointed at step {step}; re-run the same command to continue")
    return True


@dataclasses.dataclass
class Loop:
    """What one stage's training loop needs besides its step and state (see `fit`)."""

    checkpoints: Any
    log: Any
    sigterm: Any
    what: str  # 'stage pd', 'seed 0': names the stage in errors
    nonfinite: str  # 'stop' | 'skip'
    hint: str  # what to try after a non-finite loss
    should_log: Any  # (done, is_checkpoint) -> bool
    checkpoint_at: Any  # done -> bool (before the last step)
    after_step: Any = None  # (done, params) -> None, before the step's checkpoint (epoch-end evaluation)
    saved: Any = None  # (done, params) -> what the checkpoint holds (default: params)
    fault_name: str = ""  # the stage's name in MOBILEDISTILL_FAULT=kill:<name>:<step> (tests)


def fit(jit_step, params, opt_state, teacher_params, data, key, start: int, total: int, loop: Loop):
    """The training loop of every stage, pre-training and task stages alike: step `start`..`total` with the step's
    own key, the non-finite guard, progress lines, periodic checkpoints, SIGTERM (save, exit 3) and the kill hook."""
    fault = os.environ.get(FAULT_ENV, "")
    last_good = start
    for step in range(start, total):
        params, opt_state, metrics = jit_step(params, opt_state, teacher_params, next(data),
                                              jax.random.fold_in(key, step))
        done = step + 1
        is_ckpt = loop.checkpoint_at(done) and done < total
        if loop.should_log(done, is_ckpt) or loop.sigterm.raised:
            log_metrics(loop.log, done, metrics, loop.nonfinite, loop.what, last_good, loop.hint)
        if loop.after_step is not None:
            loop.after_step(done, params)
        saved = params if loop.saved is None else loop.saved(done, params)
        if save_or_preempt(loop.checkpoints, done, saved, opt_state, data, is_ckpt, loop.sigterm, loop.what):
            last_good = done
        if loop.fault_name and fault == f"kill:{loop.fault_name}:{done}":
            loop.checkpoints.wait()
            os.kill(os.getpid(), signal.SIGKILL)
    return params, opt_state


def evaluate_mlm(ctx: RunContext, stage: Stage, graphdef, params, teacher) -> dict[str, float]:
    """Held-out MLM accuracy and the stage's losses over `train.eval_batches` fixed held-out batches."""
    teacher_graphdef, teacher_params = teacher
    eval_step = jax.jit(steps.make_eval_step(stage, graphdef, teacher_graphdef))
    it = PretrainingIterator(ctx.heldout_corpus, ctx.tokenizer, global_batch_size=ctx.config.train.global_batch,
                             config=ctx.data_config, seed=12345, sharding=sharding.batch_sharding(ctx.mesh))
    totals: dict[str, float] = {}
    n = ctx.config.train.eval_batches
    for _ in range(n):
        m = jax.device_get(eval_step(params, teacher_params, next(it)))
        for k, v in m.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    out = {f"eval_{k}": v / n for k, v in totals.items() if k not in ("mlm_correct", "mlm_nll", "mlm_count")}
    out["eval_mlm_accuracy"] = totals["mlm_correct"] / max(totals["mlm_count"], 1.0)
    out["eval_mlm_nll"] = totals["mlm_nll"] / max(totals["mlm_count"], 1.0)
    return out


def run_stage(ctx: RunContext, stage: Stage, index: int, num_stages: int) -> dict:
    """Trains one stage to completion (resuming from its latest checkpoint) and returns its summary."""
    c = ctx.config
    stage_dir = ctx.workdir / stage.name
    stage_dir.mkdir(parents=True, exist_ok=True)
    label = f"[{index + 1}/{num_stages} {stage.name}]"
    cfg = ctx.teacher_cfg if stage.trains == "teacher" else ctx.student_cfg
    graphdef, abstract = abstract_model(cfg)
    if stage.projections:  # trained with the stage, in its parameter tree (strategies/projection.py)
        abstract = projection.attach(abstract, projection.abstract_projections(
            stage.projections, cfg.hidden_size, ctx.teacher_cfg.hidden_size))
    p_shard = sharding.tree_shardings(abstract, ctx.mesh)
    teacher = load_teacher(ctx, stage.teacher_from) if stage.teacher_from else (None, None)
    if c.train.nonfinite == "skip":
        stage = dataclasses.replace(stage, optimizer=dataclasses.replace(stage.optimizer, skip_nonfinite=True))

    offline = stage.teacher_top_k > 0  # the teacher's stored top-k logits come with the batches (teacher_topk.py)
    tx, step_fn = steps.make_train_step(teacher_topk.offline_stage(stage) if offline else stage, graphdef, abstract,
                                        None if offline else teacher[0], c.train.accumulation_steps)
    o_shard = sharding.tree_shardings(jax.eval_shape(tx.init, abstract), ctx.mesh)
    jit_step = jax.jit(step_fn, out_shardings=(p_shard, o_shard, sharding.replicated(ctx.mesh)),
                       donate_argnums=(0, 1))

    checkpoints = ckpt.StageCheckpoints(stage_dir, max_to_keep=c.train.keep_checkpoints)
    data = PretrainingIterator(ctx.train_corpus, ctx.tokenizer, global_batch_size=c.train.global_batch,
                               config=ctx.data_config, seed=ctx.stage_seed(stage),
                               sharding=sharding.batch_sharding(ctx.mesh))
    if offline:
        data = teacher_topk.prepare(stage_dir, stage, teacher, data, ctx.mesh, label)
    # The final checkpoint (step == stage.steps) holds the student alone: it is what the next stage reads.
    final = bool(stage.projections) and checkpoints.latest_step() == stage.steps
    like_p = _with_shardings(projection.drop(abstract) if final else abstract,
                             projection.drop(p_shard) if final else p_shard)
    like_o = _with_shardings(jax.eval_shape(tx.init, abstract), o_shard)
    per_leaf = optim.per_leaf_reader(stage.optimizer, abstract, like_o, ctx.mesh)
    latest = checkpoints.restore_latest(like_p, like_o, per_leaf)  # the newest readable one; None in a new stage
    if latest is not None:
        start, params, opt_state, data_state = latest
        params = _as_state(projection.drop(abstract) if start == stage.steps else abstract, params)
        data.set_state(data_state)
    else:
        start = 0
        params, init_report = initial_params(ctx, stage, cfg, abstract, p_shard)
        opt_state = jax.jit(tx.init, out_shardings=o_shard)(params)
        if init_report is not None and jax.process_index() == 0:
            ckpt.write_json_atomic(stage_dir / "init_from_teacher.json", init_report)

    seq, preds = c.data.max_seq_length, ctx.data_config.max_predictions
    flops = perf.stage_flops(stage, cfg, ctx.teacher_cfg if stage.teacher_from and not offline else None, seq, preds)
    n_dev = jax.device_count()
    log = StageMetrics(stage_dir, stage.name, stage.steps, start, label, c.train.global_batch * seq,
                       (flops[0] * c.train.global_batch / n_dev, flops[1] * c.train.global_batch / n_dev),
                       ctx.peak_flops)
    log.event(f"{'resuming at step ' + str(start) if start else 'starting'}: {stage.steps} steps, trains "
              f"{stage.trains}, losses {sorted(stage.losses)}"
              + (f", learned projections of hidden states {list(stage.projections)}" if stage.projections else ""))
    init_report = _read_init_report(stage_dir)
    if init_report and not start:
        log.event("initialised from the teacher: " + ", ".join(f"{k} {v}" for k, v in init_report.items()))
    base_key = jax.random.key(ctx.stage_seed(stage))
    t0 = time.perf_counter()
    every = c.train.checkpoint_every
    loop = Loop(checkpoints, log, ctx.sigterm, f"stage {stage.name}", c.train.nonfinite, "lower the learning rate",
                should_log=lambda done, is_ckpt: done % c.train.log_every == 0 or done == stage.steps or is_ckpt,
                checkpoint_at=lambda done: done % every == 0,
                saved=lambda done, p: projection.drop(p) if done == stage.steps else p,  # the final one: the student
                fault_name=stage.name)
    try:
        params, opt_state = fit(jit_step, params, opt_state, None if offline else teacher[1], data, base_key, start,
                                stage.steps, loop)
        params = projection.drop(params)  # the stage's projections end here
        if start < stage.steps or checkpoints.latest_step() is None:  # else: killed after its final save
            checkpoints.save(stage.steps, params, opt_state, data.get_state())
        checkpoints.wait()
        summary = {"stage": stage.name, "final_step": stage.steps, "seconds": time.perf_counter() - t0}
        if init_report:
            summary["init_from_teacher"] = init_report
        if stage.eval == "mlm":  # on the handed-on student: terms that need the projections are left out
            summary.update(evaluate_mlm(ctx, projection.student_only(stage), graphdef, params, teacher))
            log.event("held-out " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items() if k.startswith("eval_")))
        checkpoints.mark_done(summary)
        return summary
    finally:
        checkpoints.close()
        log.close()

