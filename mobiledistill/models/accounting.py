"""Parameter counts and analytic forward FLOPs (for sizes in the dry run and MFU in the trainer).

FLOPs are 2 x multiply-accumulates of the matrix products (dense layers and the two attention products); the
element-wise work (norms, softmax, activations) is left out, which is how MFU is conventionally counted.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
from flax import nnx

from mobiledistill.models.config import EncoderConfig
from mobiledistill.models.encoder import Encoder


def count_params(tree) -> int:
    """Number of scalars in a parameter tree (an nnx.State, a module, or any pytree of arrays/ShapeDtypeStructs)."""
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, nnx.Param)
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def abstract_params(build: Callable[[], nnx.Module]):
    """The parameter shapes of a model without allocating it (`nnx.eval_shape`)."""
    return nnx.state(nnx.eval_shape(build), nnx.Param)


def encoder_param_count(cfg: EncoderConfig) -> int:
    """Backbone parameters (embeddings + layers + pooler if present), computed without allocation."""
    return count_params(abstract_params(lambda: Encoder(cfg, nnx.Rngs(0))))


def layer_macs_per_token(cfg: EncoderConfig, seq_len: int) -> int:
    """Multiply-accumulates of one block for one token attending over `seq_len` tokens."""
    x, inner, inter = cfg.hidden_size, cfg.true_hidden_size, cfg.intermediate_size
    qk_in = inner if (cfg.use_bottleneck_attention or cfg.key_query_shared_bottleneck) else x
    v_in = inner if cfg.use_bottleneck_attention else x
    macs = 2 * qk_in * inner + v_in * inner  # Q, K, V projections
    macs += 2 * seq_len * inner  # Q K^T and P V
    macs += inner * inner  # attention output
    macs += cfg.num_feedforward_networks * 2 * inner * inter  # stacked FFNs + the final FFN
    if cfg.use_bottleneck:
        macs += x * inner * (2 if cfg.key_query_shared_bottleneck else 1)  # input (+ shared attention) bottleneck
        macs += inner * x  # output bottleneck
    return macs


def forward_flops(cfg: EncoderConfig, seq_len: int, *, num_layers: Optional[int] = None, mlm_positions: int = 0,
                  nsp: bool = False, pooler: bool = True) -> int:
    """Forward FLOPs for ONE sequence: embeddings projection, the first `num_layers` plan entries, optional heads.

    `mlm_positions` is how many positions the MLM head runs on (gathered predictions, or seq_len for all).
    """
    n_layers = len(cfg.plan) if num_layers is None else num_layers
    macs = n_layers * seq_len * layer_macs_per_token(cfg, seq_len)
    if cfg.has_embedding_transformation:
        macs += seq_len * cfg.embedding_size * (3 if cfg.trigram_input else 1) * cfg.hidden_size
    if pooler and cfg.classifier_activation:
        macs += cfg.hidden_size * cfg.hidden_size
    macs += mlm_positions * (cfg.hidden_size * cfg.hidden_size + cfg.hidden_size * cfg.vocab_size)
    if nsp:
        macs += cfg.hidden_size * 2
    return 2 * macs
