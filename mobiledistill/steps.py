"""The jitted train/eval step of a stage: teacher forward (frozen), student forward, losses, optimizer update.

Parameters are `nnx.State`s that go through plain `jax.jit` ("tree style"): a model is rebuilt from its graphdef
inside the step with `nnx.merge`. Parameters whose learning-rate scale is 0 are wrapped in `stop_gradient`, so XLA
never computes their gradients, and the optimizer leaves them bit-identical. A stage with width projections trains
them in the same tree (`strategies.projection`): the step splits them off and hands them to the losses.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mobiledistill import losses as losses_lib
from mobiledistill import optim
from mobiledistill.models import PreTrainingModel, SequenceClassificationModel, SpanModel
from mobiledistill.strategies import projection
from mobiledistill.strategies.stage import Stage

Batch = Mapping[str, jax.Array]


QKV_LOSSES = ("attn_relation",)  # registry terms that read the encoders' per-layer Q/K/V


def needs_qkv(losses: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether a `build_loss` spec has a term that reads `qkv` (the encoders then return it)."""
    return any(dict(spec).get("loss", name) in QKV_LOSSES for name, spec in losses.items())


def forward(model: nnx.Module, batch: Batch, *, num_layers: Optional[int] = None, rng=None,
            return_qkv: bool = False) -> dict[str, Any]:
    """Runs a model on a batch and returns the named outputs the loss registry reads."""
    common = dict(token_type_ids=batch.get("token_type_ids"), attention_mask=batch.get("attention_mask"),
                  rng=rng, num_layers=num_layers, return_qkv=return_qkv)
    if isinstance(model, PreTrainingModel):
        mlm, nsp, enc = model(batch["input_ids"], masked_positions=batch.get("masked_lm_positions"), **common)
        outputs = dict(mlm_logits=mlm, nsp_logits=nsp)
    elif isinstance(model, SequenceClassificationModel):
        logits, enc = model(batch["input_ids"], **common)
        outputs = dict(logits=logits)
    elif isinstance(model, SpanModel):
        start, end, enc = model(batch["input_ids"], **common)
        outputs = dict(start_logits=start, end_logits=end)
    else:
        raise TypeError(f"no forward for {type(model).__name__}")
    return dict(outputs, hidden_states=enc.hidden_states, attention_scores=enc.attention_scores,
                attention_probs=enc.attention_probs, sequence_output=enc.sequence_output,
                pooled_output=enc.pooled_output, qkv=enc.qkv)


def trainable_mask(params: nnx.State, stage: Stage):
    """Bool tree, True where the stage's learning-rate scale is non-zero."""
    return optim.trainable_mask(params, stage.optimizer.lr_scales, stage.optimizer.default_lr_scale)


def make_train_step(stage: Stage, graphdef, params: nnx.State, teacher_graphdef=None,
                    accumulation_steps: int = 1,
                    tx: optax.GradientTransformation | None = None) -> tuple[optax.GradientTransformation, Callable]:
    """Returns (optimizer, step) with `step(params, opt_state, teacher_params, batch, rng) -> (params, opt_state,
    metrics)`, pure and ready for `jax.jit` (donate params and opt_state, never the teacher). `tx` replaces the
    stage's optimizer (the compile-time benchmark uses it to separate the optimizer's share)."""
    tx = optim.make_optimizer(stage.optimizer) if tx is None else tx
    mask = trainable_mask(params, stage)
    loss_fn = losses_lib.build_loss(stage.losses)
    use_teacher = teacher_graphdef is not None
    qkv = needs_qkv(stage.losses)

    def loss_and_metrics(params, teacher_params, batch, rng):
        params = jax.tree.map(lambda m, p: p if m else jax.lax.stop_gradient(p), mask, params)
        teacher_out = None
        if use_teacher:
            teacher = nnx.merge(teacher_graphdef, jax.lax.stop_gradient(teacher_params))
            teacher_out = forward(teacher, batch, num_layers=stage.teacher_num_layers, return_qkv=qkv)
        params, projections = projection.split(params)
        student = nnx.merge(graphdef, params)
        out = forward(student, batch, num_layers=stage.num_layers, rng=rng if stage.dropout else None,
                      return_qkv=qkv)
        if projections is not None:
            out["projections"] = projections
        total, terms = loss_fn(teacher_out, out, batch)
        return total, dict(terms, loss=total)

    def step(params, opt_state, teacher_params, batch, rng):
        def micro_batch_loss(p, b, i):
            # Each micro-batch gets its own dropout key (one batch keeps `rng` itself).
            key = jax.random.fold_in(rng, i) if (stage.dropout and accumulation_steps > 1) else rng
            return loss_and_metrics(p, teacher_params, b, key)

        grad_fn = jax.value_and_grad(micro_batch_loss, has_aux=True)
        (_, metrics), grads = optim.accumulate_gradients(grad_fn, params, batch, accumulation_steps, with_index=True)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics["grad_norm"] = optax.tree.norm(jax.tree.map(lambda m, g: g if m else jnp.zeros_like(g), mask, grads))
        return params, opt_state, metrics

    return tx, step


def make_eval_step(stage: Stage, graphdef, teacher_graphdef=None) -> Callable:
    """`eval_step(params, teacher_params, batch) -> metrics` with the stage's losses (no dropout)."""
    loss_fn = losses_lib.build_loss(stage.losses)
    qkv = needs_qkv(stage.losses)

    def eval_step(params, teacher_params, batch):
        teacher_out = None
        if teacher_graphdef is not None:
            teacher_out = forward(nnx.merge(teacher_graphdef, teacher_params), batch,
                                  num_layers=stage.teacher_num_layers, return_qkv=qkv)
        params, projections = projection.split(params)
        out = forward(nnx.merge(graphdef, params), batch, num_layers=stage.num_layers, return_qkv=qkv)
        if projections is not None:
            out["projections"] = projections
        total, terms = loss_fn(teacher_out, out, batch)
        metrics = dict(terms, loss=total)
        if "mlm_logits" in out and "masked_lm_ids" in batch:
            metrics.update(mlm_metrics(out["mlm_logits"], batch))
        return metrics

    return eval_step


def mlm_metrics(mlm_logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    """Sums (not means), so batches add up exactly: correct predictions, negative log-likelihood, predicted positions.

    The plain MLM NLL makes models trained with different losses (MLM, distillation) comparable.
    """
    w = batch["masked_lm_weights"].astype(jnp.float32)
    ids = batch["masked_lm_ids"]
    correct = (jnp.argmax(mlm_logits, -1) == ids).astype(jnp.float32)
    logp = jax.nn.log_softmax(mlm_logits.astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, ids[..., None].astype(jnp.int32), -1)[..., 0]
    return dict(mlm_correct=jnp.sum(correct * w), mlm_nll=jnp.sum(nll * w), mlm_count=jnp.sum(w))
