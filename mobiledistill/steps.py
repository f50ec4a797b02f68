"""The jitted train/eval step of a stage: teacher forward (frozen), student forward, losses, optimizer update.

Parameters are `nnx.State`s that go through plain `jax.jit` ("tree style"): a model is rebuilt from its graphdef
inside the step with `nnx.merge`. Parameters whose learning-rate scale is 0 are wrapped in `stop_gradient`, so XLA
never computes their gradients, and the optimizer leaves them bit-identical. A stage with width projections trains
them in the same tree (`strategies.projection`): the step splits them off and hands them to the losses. The
trainable per-layer parameters are differentiated and updated as layer-stacked arrays (`optim_stack`): one compiled
update per parameter suffix instead of one per layer.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mobiledistill import losses as losses_lib
from mobiledistill import optim, optim_stack
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
    metrics)`, pure and ready for `jax.jit` (donate params and opt_state, never the teacher). With the stage's
    optimizer (`stack_layers`, the default) the gradients and the update are taken in the layer-stacked view
    (`optim_stack`); a given `tx` replaces it and updates leaf by leaf."""
    stacked = tx is None and stage.optimizer.stack_layers
    if stacked:  # the gradients are taken in the stacked view: no per-layer round trip between scan and optimizer
        inner, stackable = optim.stacked_parts(stage.optimizer)
        tx = optim_stack.over_layer_stacks(inner, stackable)  # what the caller builds the state with
    elif tx is None:
        tx = optim.make_optimizer(stage.optimizer)
    mask = trainable_mask(params, stage)
    if stacked:
        leaves = jax.tree.leaves(mask)
        view_mask = {path: all(leaves[i] for i in idx) for path, idx in optim_stack.layout(params, stackable)}
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
        def micro_batch_loss(x, b, i):
            # Each micro-batch gets its own dropout key (one batch keeps `rng` itself).
            key = jax.random.fold_in(rng, i) if (stage.dropout and accumulation_steps > 1) else rng
            p = optim_stack.from_view(x, params, stackable) if stacked else x
            return loss_and_metrics(p, teacher_params, b, key)

        x = optim_stack.to_view(params, stackable) if stacked else params
        grad_fn = jax.value_and_grad(micro_batch_loss, has_aux=True)
        (_, metrics), grads = accumulate_gradients(grad_fn, x, batch, accumulation_steps, with_index=True)
        updates, opt_state = (inner if stacked else tx).update(grads, opt_state, x)
        x = optax.apply_updates(x, updates)
        kept = jax.tree.map(lambda m, g: g if m else jnp.zeros_like(g), view_mask if stacked else mask, grads)
        metrics["grad_norm"] = optax.tree.norm(kept)
        return (optim_stack.from_view(x, params, stackable) if stacked else x), opt_state, metrics

    return tx, step


def accumulate_gradients(
    value_and_grad_fn: Callable[..., tuple[Any, Any]],
    params: Any,
    batch: Any,
    num_micro_batches: int,
    *,
    with_index: bool = False,
) -> tuple[Any, Any]:
    """Mean of `value_and_grad_fn(params, micro_batch)` over micro-batches, with `lax.scan`.

    An alternative to `accumulation_steps` (use one or the other): the whole global batch is
    processed in one jitted call. Micro-batch i takes rows i, i+n, i+2n, ... so that each stays
    spread over a batch-sharded mesh. The value may be any pytree (e.g. (loss, metrics)); the mean
    of micro-batch means equals the global mean for per-example means of equal-size micro-batches.
    `with_index=True` calls `value_and_grad_fn(params, micro_batch, i)` with the micro-batch index i
    (an int32 scalar; 0 when there is one micro-batch), e.g. to give each its own dropout key.
    """
    n = int(num_micro_batches)
    fn = value_and_grad_fn if with_index else (lambda p, b, i: value_and_grad_fn(p, b))
    if n == 1:
        return fn(params, batch, jnp.zeros((), jnp.int32))
    sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1 or next(iter(sizes)) % n:
        raise ValueError(
            f"accumulate_gradients: batch leading sizes {sorted(sizes)} must be one "
            f"size divisible by num_micro_batches={n}"
        )
    micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1), batch)
    first = jax.tree.map(lambda x: x[0], micro)
    index = jnp.zeros((), jnp.int32)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, params, first, index))

    def body(acc, xs):
        i, mb = xs
        out = fn(params, mb, i)
        return jax.tree.map(jnp.add, acc, out), None

    total, _ = jax.lax.scan(body, zeros, (jnp.arange(n, dtype=jnp.int32), micro))
    return jax.tree.map(lambda x: x / n, total)


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
