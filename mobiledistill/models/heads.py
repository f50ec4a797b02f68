"""Task heads and the models built from an encoder plus heads (SPEC §2).

The MLM head's output embedding is the encoder's word embedding table, passed in at call time rather than shared as a
submodule, so the parameter tree stays a plain tree.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from mobiledistill.models.config import EncoderConfig
from mobiledistill.models.encoder import (Encoder, EncoderOutput, Norm, activation, compute_dtype, dense, dropout)

Array = jax.Array


def gather_positions(sequence: Array, positions: Array) -> Array:
    """[B, S, H] x [B, P] -> [B, P, H]: the MLM head then runs only on the masked positions."""
    return jnp.take_along_axis(sequence, positions[..., None].astype(jnp.int32), axis=1)


class MLMHead(nnx.Module):
    """Dense + act + LayerNorm, then logits against the (tied) word embeddings.

    MobileBERT form (embedding_size < hidden_size): logits = h · concat(word_embeddings[V,E], extra_output_weights[V,H-E])^T
    + bias. BERT form (embedding_size == hidden_size): the tied decoder, logits = h · word_embeddings^T + bias.
    """

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.act = activation(cfg.hidden_act)
        self.transform = dense(cfg, cfg.hidden_size, cfg.hidden_size, rngs)
        self.transform_norm = Norm(cfg.hidden_size, "layer_norm", cfg.layer_norm_eps, compute_dtype(cfg))
        extra = cfg.hidden_size - cfg.embedding_size
        if extra:
            init = nnx.initializers.normal(cfg.initializer_range)
            self.extra_output_weights = nnx.Param(init(rngs.params(), (cfg.vocab_size, extra), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((cfg.vocab_size,), jnp.float32))

    def __call__(self, h: Array, word_embeddings: Array) -> Array:
        h = self.transform_norm(self.act(self.transform(h)))
        table = word_embeddings
        if self.cfg.hidden_size != self.cfg.embedding_size:
            table = jnp.concatenate([word_embeddings, self.extra_output_weights[...]], axis=1)
        logits = jnp.einsum("...h,vh->...v", h, table.astype(h.dtype), preferred_element_type=jnp.float32)
        return logits + self.bias[...]


class PreTrainingModel(nnx.Module):
    """Encoder + MLM head + NSP head (MobileBertForPreTraining / BertForPreTraining)."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.encoder = Encoder(cfg, rngs)
        self.mlm = MLMHead(cfg, rngs)
        self.nsp = dense(cfg, cfg.hidden_size, 2, rngs)

    def __call__(self, input_ids, token_type_ids=None, attention_mask=None, masked_positions: Optional[Array] = None,
                 *, rng=None, num_layers=None, return_qkv=False) -> tuple[Array, Array, EncoderOutput]:
        """Returns (MLM logits [B, P or S, V] float32, NSP logits [B, 2] float32, encoder output)."""
        out = self.encoder(input_ids, token_type_ids, attention_mask, rng=rng, num_layers=num_layers,
                           return_qkv=return_qkv)
        seq = out.sequence_output if masked_positions is None else gather_positions(out.sequence_output,
                                                                                     masked_positions)
        mlm_logits = self.mlm(seq, self.encoder.embeddings.word_embeddings.embedding[...])
        nsp_logits = self.nsp(out.pooled_output).astype(jnp.float32)
        return mlm_logits, nsp_logits, out


class SequenceClassificationModel(nnx.Module):
    """Encoder + dropout + linear classifier on the pooled output (num_labels=1 means regression, e.g. STS-B)."""

    def __init__(self, cfg: EncoderConfig, num_labels: int, rngs: nnx.Rngs, classifier_dropout: float | None = None):
        self.encoder = Encoder(cfg, rngs)
        self.num_labels = num_labels
        self.dropout_rate = cfg.hidden_dropout_prob if classifier_dropout is None else classifier_dropout
        self.classifier = dense(cfg, cfg.hidden_size, num_labels, rngs)

    def __call__(self, input_ids, token_type_ids=None, attention_mask=None, *, rng=None,
                 num_layers=None, return_qkv=False) -> tuple[Array, EncoderOutput]:
        out = self.encoder(input_ids, token_type_ids, attention_mask, rng=rng, num_layers=num_layers,
                           return_qkv=return_qkv)
        # fold_in takes uint32: a site number no encoder dropout site uses (-1 overflowed).
        site_rng = None if rng is None else jax.random.fold_in(rng, 0x7FFFFFFF)
        pooled = dropout(out.pooled_output, self.dropout_rate, site_rng)
        return self.classifier(pooled).astype(jnp.float32), out


class SpanModel(nnx.Module):
    """Encoder + start/end span logits for extractive QA (SQuAD)."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.encoder = Encoder(cfg, rngs)
        self.qa_outputs = dense(cfg, cfg.hidden_size, 2, rngs)

    def __call__(self, input_ids, token_type_ids=None, attention_mask=None, *, rng=None,
                 num_layers=None, return_qkv=False) -> tuple[Array, Array, EncoderOutput]:
        out = self.encoder(input_ids, token_type_ids, attention_mask, rng=rng, num_layers=num_layers,
                           return_qkv=return_qkv)
        logits = self.qa_outputs(out.sequence_output).astype(jnp.float32)
        return logits[..., 0], logits[..., 1], out
