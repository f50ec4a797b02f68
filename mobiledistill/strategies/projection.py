"""Learned width projections of a layer-wise stage (teacher and student of different feature-map widths, issue 16).

A stage whose `Stage.projections` names student hidden-state indices trains one linear map per index, student width ->
teacher width (TinyBERT's W_h), together with the student: its parameter tree is the student's plus a top-level
`projections` entry, `{"<hidden-state index>": {"kernel": [d_s, d_t], "bias": [d_t]}}`, so they get gradients, optimizer
state, checkpoints and resume like every other parameter. They belong to the stage, not to the student: the step
passes them to the losses in `student_out["projections"]` (the model never sees them), and the stage's final
checkpoint, which the next stage and fine-tuning read, holds the student alone.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mobiledistill.strategies.stage import Stage

KEY = "projections"
LR_RULE = (f"^{KEY}/", 1.0)  # projections always train at the stage's full rate


class _Projection(nnx.Module):
    """kernel ~ N(0, 1/d_s) (the projected map keeps the student's scale), bias 0."""

    def __init__(self, d_in: int, d_out: int, key):
        self.kernel = nnx.Param(jax.random.normal(key, (d_in, d_out), jnp.float32) * d_in ** -0.5)
        self.bias = nnx.Param(jnp.zeros((d_out,), jnp.float32))


def init_projections(indices, d_in: int, d_out: int, seed: int) -> nnx.State:
    """Fresh projections for the given student hidden-state indices, deterministic in `seed`."""
    key = jax.random.key(seed)
    return nnx.State({str(i): _raw(nnx.state(_Projection(d_in, d_out, jax.random.fold_in(key, int(i))), nnx.Param))
                      for i in indices})


def _raw(state):
    """The plain nested mapping inside an `nnx.State` (building States from raw mappings keeps one pytree type)."""
    return state.raw_mapping if isinstance(state, nnx.State) else state


def abstract_projections(indices, d_in: int, d_out: int) -> nnx.State:
    return jax.eval_shape(lambda: init_projections(indices, d_in, d_out, 0))


def attach(params: nnx.State, projections: nnx.State | None) -> nnx.State:
    """The stage's trained tree: the student's parameters plus `projections` (a copy; `params` is unchanged)."""
    if projections is None or not len(projections):
        return params
    if KEY in params:
        raise ValueError(f"the student's parameters already hold a '{KEY}' entry")
    return nnx.State({**_raw(params), KEY: _raw(projections)})


def split(params: nnx.State):
    """(student parameters, projections as a plain {index: {kernel, bias}} dict, or None when there are none)."""
    if KEY not in params:
        return params, None
    student = nnx.State({k: v for k, v in _raw(params).items() if k != KEY})
    return student, nnx.to_pure_dict(params[KEY])


def drop(params: nnx.State) -> nnx.State:
    """The student alone (what the stage hands on and keeps in its final checkpoint)."""
    return split(params)[0]


def uses_projections(losses) -> bool:
    return any(bool(dict(spec).get("projection", False)) for spec in losses.values())


def student_only(stage: Stage) -> Stage:
    """`stage` without the loss terms that need projections (its evaluation runs on the handed-on student)."""
    kept = {name: spec for name, spec in stage.losses.items() if not dict(spec).get("projection", False)}
    return dataclasses.replace(stage, losses=kept, projections=())
