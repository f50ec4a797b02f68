"""Training one seed: initial parameters, the cached teacher logits, the jitted loop, per-epoch evaluation."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx

from mobiledistill import checkpoint as ckpt
from mobiledistill import evaluate, optim, sharding, steps
from mobiledistill.data import ArrayIterator
from mobiledistill.finetune import qat
from mobiledistill.finetune.context import Context
from mobiledistill.finetune.losses import loss_spec
from mobiledistill.finetune.predict import _eval_line, _flat_metrics, predict_arrays, score
from mobiledistill.finetune.sources import _as_state, copy_matching, new_task_model
from mobiledistill.metrics import StageMetrics
from mobiledistill.models import forward_flops
from mobiledistill.optim import OptimizerConfig
from mobiledistill.strategies.stage import Stage
from mobiledistill.train import Loop, fit


def _keep_best_encoder(ctx: Context, run_dir: epath.Path, params, metrics: Mapping[str, Mapping[str, float]],
                       epoch: int) -> None:
    """PTP: writes the encoder to best_encoder.npz when the mean dev loss is the lowest so far."""
    loss = float(np.mean([m["loss"] for m in metrics.values()]))
    info = run_dir / "best_encoder.json"
    if info.exists():
        try:
            best = float(json.loads(info.read_text())["loss"])
        except (ValueError, KeyError, TypeError) as e:
            ckpt.warn(f"{info} cannot be read ({type(e).__name__}): keeping this epoch's encoder as the best")
            best = float("inf")
        if best <= loss:
            return
    if jax.process_index() == 0:
        flat = {"/".join(map(str, p)): np.asarray(jax.device_get(v.get_value() if hasattr(v, "get_value") else v))
                for p, v in nnx.to_flat_state(params["encoder"])}
        tmp = run_dir / "best_encoder.tmp.npz"
        with tmp.open("wb") as f:
            np.savez(f, **flat)
        tmp.replace(run_dir / "best_encoder.npz")
        ckpt.write_json_atomic(info, {"loss": loss, "epoch": epoch})


def initial_params(ctx: Context, seed: int) -> tuple[Any, nnx.State]:
    """(graphdef, parameters): a random task model (one compiled init for all seeds), encoder copied in."""
    if "init" not in ctx.compiled:
        make = lambda key: new_task_model(ctx.kind, ctx.cfg, ctx.data.num_labels, key)
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: make(jax.random.key(0))))
        ctx.compiled["init"] = (graphdef, jax.jit(lambda key: nnx.split(make(key))[1]))
    graphdef, init = ctx.compiled["init"]
    params = init(jax.random.key(seed))
    if ctx.source.task_params is not None:  # init='finetune:': encoder and head
        copy_matching(params, ctx.source.task_params, ctx.source.description)
    elif ctx.source.params is not None:
        enc = params["encoder"]
        copy_matching(enc, ctx.source.params, ctx.source.description)
        params["encoder"] = enc
    return graphdef, params


def teacher_outputs(ctx: Context) -> dict[str, np.ndarray]:
    """The teacher's head outputs over the training features (no dropout), cached in the workdir."""
    t = ctx.teacher
    path = ctx.workdir / "teacher_logits.npz"
    key = f"{ctx.c.distill.teacher}|{len(ctx.data.train['input_ids'])}|{ctx.c.data.max_seq_length}"
    if path.exists():
        try:
            cached = ckpt.read_npz(path, "teacher-logit cache")
        except ckpt.CheckpointError as e:  # a cache: recompute it
            ckpt.warn(f"{e}: computing the teacher's logits again")
            cached = {}
        if str(cached.pop("key", "")) == key:
            return cached
    print(f"teacher ({t.description}): computing logits of {len(ctx.data.train['input_ids'])} training "
          f"examples", flush=True)
    out = predict_arrays(ctx.predictor(t.graphdef, t.kind), t.params, ctx.data.train, ctx.c.train.eval_batch,
                         ctx.mesh)
    if jax.process_index() == 0:
        tmp = ctx.workdir / "teacher_logits.tmp.npz"
        with tmp.open("wb") as f:
            np.savez(f, key=np.array(key), **out)
        tmp.replace(path)
    return out


def evaluate_params(ctx: Context, graphdef, params) -> tuple[dict, dict]:
    """({split: metrics}, {split: (predictions, extra)}) on every eval split."""
    predict = ctx.predictor(graphdef, ctx.kind)
    metrics, written = {}, {}
    for split, features in ctx.data.evals.items():
        arrays = features.arrays if ctx.kind == "span" else features
        outputs = predict_arrays(predict, params, arrays, ctx.c.train.eval_batch, ctx.mesh)
        m, preds, extra = score(ctx.c, ctx.kind, features, outputs, ctx.data.task)
        metrics[split], written[split] = m, (preds, extra)
    return metrics, written


def write_outputs(run_dir: epath.Path, metrics: dict, written: dict, prefix: str = "") -> None:
    if jax.process_index() != 0:
        return
    for split, (preds, extra) in written.items():
        evaluate.write_eval_outputs(str(run_dir), preds, metrics[split], name=prefix + split, overwrite=True,
                                    **{k: v for k, v in extra.items() if v is not None})


def train_seed(ctx: Context, seed: int, index: int) -> dict:
    c = ctx.c
    run_dir = ctx.workdir / f"seed_{seed}"
    label = f"[seed {seed} ({index + 1}/{len(c.seeds)})]"
    done = ckpt.stage_done(run_dir)
    if done is not None:
        print(f"{label} finished earlier: skipped", flush=True)
        return done
    run_dir.mkdir(parents=True, exist_ok=True)
    train_arrays = dict(ctx.data.train)
    teacher = ctx.teacher
    _, cacheable = loss_spec(c, ctx.kind, ctx.data.num_labels, teacher)
    if teacher is not None and cacheable:
        train_arrays.update({f"teacher_{k}": v for k, v in teacher_outputs(ctx).items()})
    use_teacher_forward = teacher is not None and not cacheable

    data = ArrayIterator(train_arrays, c.train.batch, shuffle=True, drop_remainder=True, seed=seed,
                         sharding=sharding.batch_sharding(ctx.mesh))
    per_epoch = data.steps_per_epoch
    total = per_epoch * c.train.epochs
    optimizer = OptimizerConfig(name="adamw", learning_rate=c.train.lr, schedule="warmup_linear",
                                warmup_fraction=c.train.warmup_fraction, total_steps=total,
                                weight_decay=c.train.weight_decay, eps=c.train.eps,
                                clip_norm=c.train.clip_norm or None, skip_nonfinite=c.train.nonfinite == "skip")
    if qat.enabled(c):  # the ranges: frozen or trained (mobiledistill.finetune.qat)
        optimizer = dataclasses.replace(optimizer, lr_scales=qat.lr_rules(c))
    stage = Stage(name=f"seed_{seed}", steps=total, losses=ctx.spec, optimizer=optimizer, init="fresh",
                  teacher_from=c.distill.teacher or None, dropout=bool(c.train.dropout))

    graphdef, init = initial_params(ctx, seed)
    if qat.enabled(c):
        graphdef, init = qat.start(c, graphdef, init, ctx.data.train)
    p_shard = sharding.tree_shardings(init, ctx.mesh)
    params = jax.device_put(init, p_shard)
    if total not in ctx.compiled:  # seeds share one jitted step (it depends on the step count, not the seed)
        tx, step_fn = steps.make_train_step(stage, graphdef, params,
                                            teacher.graphdef if use_teacher_forward else None)
        o_shard = sharding.tree_shardings(jax.eval_shape(tx.init, params), ctx.mesh)
        ctx.compiled[total] = (tx, o_shard, jax.jit(tx.init, out_shardings=o_shard), jax.jit(
            step_fn, out_shardings=(p_shard, o_shard, sharding.replicated(ctx.mesh)), donate_argnums=(0, 1)))
    tx, o_shard, init_opt, jit_step = ctx.compiled[total]
    opt_state = init_opt(params)
    t_params = teacher.params if use_teacher_forward else None

    checkpoints = ckpt.StageCheckpoints(run_dir, max_to_keep=c.train.keep_checkpoints)
    per_leaf = optim.per_leaf_reader(stage.optimizer, params, opt_state, ctx.mesh)  # an older layout
    latest = checkpoints.restore_latest(params, opt_state, per_leaf)  # the newest readable checkpoint, if any
    start = 0
    if latest is not None:
        start, restored, opt_state, data_state = latest
        params = _as_state(init, restored)
        data.set_state(data_state)
    seq = c.data.max_seq_length
    flops = 3 * forward_flops(ctx.cfg, seq) * c.train.batch / jax.device_count()
    t_flops = (forward_flops(teacher.cfg, seq) * c.train.batch / jax.device_count()) if use_teacher_forward else 0
    log = StageMetrics(run_dir, stage.name, total, start, label, c.train.batch * seq, (flops, t_flops), ctx.peak)
    log.event(f"{'resuming at step ' + str(start) if start else 'starting'}: {total} steps ({c.train.epochs} epochs "
              f"of {per_epoch}), {ctx.source.description}, losses {sorted(ctx.spec)}")
    key = jax.random.key(seed)
    eval_log = run_dir / "eval.jsonl"
    t0 = time.perf_counter()

    def epoch_end_eval(done_steps, params):
        if done_steps % per_epoch or done_steps == total:
            return
        ev, _ = evaluate_params(ctx, graphdef, params)
        log.event(f"epoch {done_steps // per_epoch}: {_eval_line(ev)}")
        if c.get("ptp") is not None:
            _keep_best_encoder(ctx, run_dir, params, ev, done_steps // per_epoch)
        _append_jsonl(eval_log, {"step": done_steps, "epoch": done_steps // per_epoch, **_flat_metrics(ev)})

    every = c.train.checkpoint_every
    loop = Loop(checkpoints, log, ctx.sigterm, f"seed {seed}", c.train.nonfinite, "lower train.lr",
                should_log=lambda done, _: done % c.train.log_every == 0 or done % per_epoch == 0,
                checkpoint_at=lambda done: done % per_epoch == 0 or done % every == 0,
                after_step=epoch_end_eval, fault_name=f"{ctx.workdir.name}/seed_{seed}")
    try:
        params, opt_state = fit(jit_step, params, opt_state, t_params, data, key, start, total, loop)
        if checkpoints.latest_step() != total:
            checkpoints.save(total, params, opt_state, data.get_state())
        checkpoints.wait()
        ev, written = evaluate_params(ctx, graphdef, params)
        write_outputs(run_dir, ev, written)
        if c.get("ptp") is not None:
            _keep_best_encoder(ctx, run_dir, params, ev, c.train.epochs)
        flat = _flat_metrics(ev)
        if qat.enabled(c) and jax.process_index() == 0:
            qat.write_ranges(c, run_dir, graphdef, params)
        _append_jsonl(eval_log, {"step": total, "epoch": c.train.epochs, **flat})
        log.event(f"final (epoch {c.train.epochs}): {_eval_line(ev)}")
        summary = {"seed": int(seed), "final_step": total, "seconds": time.perf_counter() - t0, **flat}
        checkpoints.mark_done(summary)
        return summary
    finally:
        checkpoints.close()
        log.close()


def _append_jsonl(path: epath.Path, record: dict) -> None:
    if jax.process_index() == 0:
        with path.open("a") as f:
            f.write(json.dumps(evaluate._jsonable(record)) + "\n")
