"""The serving forward of a model (SPEC §13, issue #11): what export's latency check, the benchmarks and a
deployment in JAX call.

    predict = Predictor(model)                      # a task model, PreTrainingModel or Encoder (any config)
    logits, = predict(input_ids, attention_mask, token_type_ids)
    *heads, last_hidden_state = Predictor(model, hidden=True)(ids, mask, types)

What it does differently from `jax.jit(lambda state, *x: nnx.merge(graphdef, state)(*x))` (the profile of a
full-size MobileBERT at batch 1 x 128 on a 2-core CPU, `benchmarks/inference.py`):

- Unrolled layers, no remat: `scan_layers` and `remat` are training-time memory/compile-time options (the config a
  model was trained with travels in model.json). At inference a scanned 24-layer stack ran 0.4-0.8x as fast as the
  unrolled one (four runs).
- The parameters go in as one flat list of arrays, flattened once. An `nnx.State` argument is re-flattened in Python
  on every call (a Python callback per Variable: 1,113 for MobileBERT): 16-18 ms until the call returned, against
  7 ms for the flat list, on a loaded 2-core machine.
- Dropout-free by construction (no rng); float32 unless the model's config says otherwise.

The numbers are the model's: the same modules, parameters and config apart from the two options above (which
tests/test_scan.py shows change nothing numerically).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mobiledistill.models import Encoder, EncoderOutput

_TRAINING_ONLY = {"scan_layers": False, "remat": "none"}


def serving_model(model: nnx.Module) -> nnx.Module:
    """A copy of `model` whose modules use the serving config (layers unrolled, no remat); same parameters."""
    model = nnx.clone(model)
    for _, module in nnx.iter_modules(model):
        cfg = getattr(module, "cfg", None)
        if cfg is not None and hasattr(cfg, "scan_layers"):
            module.cfg = cfg.replace(**_TRAINING_ONLY)
    return model


class Predictor:
    """A compiled, dropout-free forward of `model` (compiled once per input shape).

    Returns a tuple of float arrays: the model's head outputs (classification: logits; spans: start, end logits;
    pre-training: MLM, NSP logits; a bare Encoder: sequence and pooled output), plus the final hidden state when
    `hidden`."""

    def __init__(self, model: nnx.Module, hidden: bool = False):
        self.model = serving_model(model)
        graphdef, state = nnx.split(self.model)
        self.leaves, treedef = jax.tree.flatten(state)
        self.hidden = hidden

        def forward(leaves, input_ids, attention_mask, token_type_ids):
            m = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
            out = m(input_ids, token_type_ids, attention_mask)
            if isinstance(out, EncoderOutput):
                heads, enc = (out.sequence_output, out.pooled_output), out
            else:
                heads, enc = tuple(out[:-1]), out[-1]
            return heads + ((enc.sequence_output,) if hidden else ())

        self._forward = jax.jit(forward)

    @property
    def config(self):
        enc = self.model if isinstance(self.model, Encoder) else self.model.encoder
        return enc.cfg

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None) -> tuple[jax.Array, ...]:
        ids = jnp.asarray(input_ids, jnp.int32)
        mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        types = jnp.zeros_like(ids) if token_type_ids is None else jnp.asarray(token_type_ids, jnp.int32)
        return self._forward(self.leaves, ids, mask, types)

    def compile(self, batch: int, seq_len: int) -> "Predictor":
        """Compiles (and runs once) the forward for [batch, seq_len] inputs; returns self."""
        ids = jnp.ones((batch, seq_len), jnp.int32)
        jax.block_until_ready(self(ids, ids, jnp.zeros_like(ids)))
        return self
