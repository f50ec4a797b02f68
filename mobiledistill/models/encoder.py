"""The encoder family of SPEC §2 as Flax NNX modules: embeddings, blocks, encoder.

One block class covers BERT (no bottleneck), IB-BERT (bottleneck, Q/K/V from the block input), MobileBERT (Q = K from
a shared 512->128 bottleneck, V from the block input) and MobileBERT_TINY (Q = K = V from the input bottleneck).
Models hold parameters only; dropout randomness comes in as an explicit key so that the whole state goes through a
plain `jax.jit` ("tree style").
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx, struct

from mobiledistill.models.config import EncoderConfig

Array = jax.Array


@struct.dataclass
class EncoderOutput:
    """Everything the losses need; under `jax.jit`, outputs nobody uses are removed by XLA.

    hidden_states: executed layers + 1 entries, index 0 = embedding output.
    attention_scores: per executed layer [B, heads, S, S], pre-softmax, masked (float32).
    attention_probs: per executed layer [B, heads, S, S] (float32, before attention dropout).
    qkv: only with `return_qkv=True` (else None): per executed layer the (query, key, value) projections [B, S, d]
        before the head split (d = the block's attention width), for MiniLM-style relation losses.
    """

    sequence_output: Array
    pooled_output: Array
    hidden_states: tuple[Array, ...]
    attention_scores: tuple[Array, ...]
    attention_probs: tuple[Array, ...]
    qkv: Optional[tuple[tuple[Array, Array, Array], ...]] = None


def activation(name: str):
    return {
        "relu": jax.nn.relu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "tanh": jnp.tanh,
    }[name]


def compute_dtype(cfg: EncoderConfig):
    return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


def token_mean(x: Array, mask: Array) -> Array:
    """Per-row mean of `x` [B, S, H] over the tokens where `mask` [B, S] is non-zero -> [B, H] (float32 sums, x's
    dtype out); `losses._util.masked_mean` is the scalar mean of a loss."""
    w = (mask != 0).astype(jnp.float32)[..., None]
    total = jnp.sum(x.astype(jnp.float32) * w, axis=1)
    return (total / jnp.maximum(jnp.sum(w, axis=1), 1.0)).astype(x.dtype)


def keep_mask(rng: Array, keep_prob: float, shape: tuple[int, ...]) -> Array:
    """Bernoulli(keep_prob) from 16-bit uniforms, two per 32-bit threefry word: half the generator's work of
    `jax.random.bernoulli` (the masks were ~15% of a MobileBERT train step on CPU). keep_prob is rounded to a multiple
    of 2^-16 (0.9 -> 0.899994). The leading dimensions stay as they are, so the draw is sharded like `x`."""
    *lead, last = shape
    words = jax.random.bits(rng, (*lead, (last + 1) // 2), jnp.uint32)
    u16 = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(*lead, -1)[..., :last]
    return u16 < jnp.uint16(min(round(keep_prob * 65536), 65535))


def dropout(x: Array, rate: float, rng: Optional[Array]) -> Array:
    """Inverted dropout; identity when `rng` is None (deterministic mode) or the rate is 0."""
    if rng is None or rate == 0.0:
        return x
    return jnp.where(keep_mask(rng, 1.0 - rate, x.shape), x / (1.0 - rate), jnp.zeros_like(x))


def _sub_rng(rng: Optional[Array], site: int) -> Optional[Array]:
    return None if rng is None else jax.random.fold_in(rng, site)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _kernel_matmul(x: Array, w: Array, precision) -> Array:
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _kernel_matmul_fwd(x, w, precision):
    return _kernel_matmul(x, w, precision), (x, w)


def _kernel_matmul_bwd(precision, res, g):
    x, w = res
    dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())), precision=precision)
    # dW = x^T g contracts the tokens of both operands. XLA's CPU matmul runs it faster with the result that has the
    # fewer rows: [out, in] when out < in (1.3x at 512 -> 128), [in, out] otherwise (1.15x at 128 -> 512). The
    # [out, in] form is computed as dW^T and transposed; the barrier stops XLA from folding the transpose back into
    # the dot. Same products, same sums: the gradient is unchanged.
    g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
    tokens = (((0,), (0,)), ((), ()))
    if w.shape[1] >= w.shape[0]:
        return dx, jax.lax.dot_general(x2, g2, tokens, precision=precision)
    dwt = jax.lax.dot_general(g2, x2, tokens, precision=precision)
    return dx, jax.lax.optimization_barrier(dwt).T


_kernel_matmul.defvjp(_kernel_matmul_fwd, _kernel_matmul_bwd)


def linear_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
    """`lax.dot_general` for `nnx.Linear`; on CPU, x @ kernel gets the faster weight-gradient orientation above."""
    (lhs_c, rhs_c), (lhs_b, rhs_b) = dimension_numbers
    plain = tuple(lhs_c) == (lhs.ndim - 1,) and tuple(rhs_c) == (0,) and rhs.ndim == 2 and not (lhs_b or rhs_b)
    if (jax.default_backend() != "cpu" or not plain or preferred_element_type is not None
            or out_sharding is not None):
        kw = {} if out_sharding is None else {"out_sharding": out_sharding}
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type, **kw)
    return _kernel_matmul(lhs, rhs, precision)


def dense(cfg: EncoderConfig, fan_in: int, fan_out: int, rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
    """A Linear with the BERT initialiser (normal, std = initializer_range) and the configured compute dtype."""
    return nnx.Linear(fan_in, fan_out, use_bias=use_bias, dtype=compute_dtype(cfg), param_dtype=jnp.float32,
                      kernel_init=nnx.initializers.normal(cfg.initializer_range), dot_general=linear_dot_general,
                      rngs=rngs)


class Norm(nnx.Module):
    """LayerNorm (computed in float32) or MobileBERT's NoNorm (`scale * x + bias`)."""

    def __init__(self, features: int, kind: str, eps: float, dtype):
        self.kind, self.eps, self.dtype = kind, eps, dtype
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))

    def __call__(self, x: Array) -> Array:
        if self.kind == "no_norm":
            return (x * self.scale[...].astype(x.dtype) + self.bias[...].astype(x.dtype)).astype(self.dtype)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(self.dtype)


def norm(cfg: EncoderConfig, features: int, torch_default_eps: bool = False) -> Norm:
    eps = 1e-5 if (torch_default_eps and cfg.hf_eps_quirk) else cfg.layer_norm_eps
    return Norm(features, cfg.normalization_type, eps, compute_dtype(cfg))


class DenseNorm(nnx.Module):
    """`Norm(Dense(x) [+ residual])`: bottlenecks, attention output, FFN outputs."""

    def __init__(self, cfg: EncoderConfig, fan_in: int, fan_out: int, rngs: nnx.Rngs, torch_default_eps=False):
        self.dense = dense(cfg, fan_in, fan_out, rngs)
        self.norm = norm(cfg, fan_out, torch_default_eps)

    def __call__(self, x: Array, residual: Optional[Array] = None, drop_rate: float = 0.0, rng=None) -> Array:
        y = dropout(self.dense(x), drop_rate, rng)
        return self.norm(y if residual is None else y + residual)


class FeedForward(nnx.Module):
    """One of MobileBERT's stacked FFNs: `Norm(Dense(act(Dense(h))) + h)`."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.act = activation(cfg.hidden_act)
        self.intermediate = dense(cfg, cfg.true_hidden_size, cfg.intermediate_size, rngs)
        self.output = DenseNorm(cfg, cfg.intermediate_size, cfg.true_hidden_size, rngs)

    def __call__(self, h: Array) -> Array:
        return self.output(self.act(self.intermediate(h)), h)


def multi_head_attention(cfg: EncoderConfig, q: Array, k: Array, v: Array, mask: Array, rng=None):
    """Scaled dot-product attention; returns (context [B,S,D], masked scores, probabilities)."""
    b, s, d = q.shape
    h = cfg.num_attention_heads
    split = lambda t: t.reshape(b, t.shape[1], h, d // h)
    scores = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k), preferred_element_type=jnp.float32)
    scores = scores * (d // h) ** -0.5
    keep = mask[:, None, None, :].astype(bool)
    if cfg.attention_mask_value == "min":
        scores = scores + jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min)
    else:
        scores = jnp.where(keep, scores, jnp.float32(cfg.attention_mask_value))
    probs = jax.nn.softmax(scores, axis=-1)
    dropped = dropout(probs, cfg.attention_probs_dropout_prob, rng)
    context = jnp.einsum("bhqk,bkhd->bqhd", dropped.astype(v.dtype), split(v)).reshape(b, s, d)
    return context, scores, probs


class Block(nnx.Module):
    """One transformer block of SPEC §2 (steps 1-6)."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        inner, x_dim = cfg.true_hidden_size, cfg.hidden_size
        if cfg.use_bottleneck:
            self.bottleneck_input = DenseNorm(cfg, x_dim, inner, rngs)
        if cfg.key_query_shared_bottleneck:
            self.bottleneck_attention = DenseNorm(cfg, x_dim, inner, rngs)
        qk_in = inner if (cfg.use_bottleneck_attention or cfg.key_query_shared_bottleneck) else x_dim
        v_in = inner if cfg.use_bottleneck_attention else x_dim
        self.query = dense(cfg, qk_in, inner, rngs)
        self.key = dense(cfg, qk_in, inner, rngs)
        self.value = dense(cfg, v_in, inner, rngs)
        self.attention_output = DenseNorm(cfg, inner, inner, rngs)
        self.ffn = nnx.List([FeedForward(cfg, rngs) for _ in range(cfg.num_feedforward_networks - 1)])
        self.act = activation(cfg.hidden_act)
        self.intermediate = dense(cfg, inner, cfg.intermediate_size, rngs)
        self.output = DenseNorm(cfg, cfg.intermediate_size, inner, rngs, torch_default_eps=True)
        if cfg.use_bottleneck:
            self.output_bottleneck = DenseNorm(cfg, inner, x_dim, rngs)

    def __call__(self, x: Array, mask: Array, rng=None, swap_qk: bool = False, return_qkv: bool = False):
        """(output, scores, probs), plus the (query, key, value) projections when `return_qkv`."""
        cfg = self.cfg
        p_hidden = cfg.hidden_dropout_prob
        if cfg.use_bottleneck:
            layer_input = self.bottleneck_input(x)
            if cfg.use_bottleneck_attention:
                q_in = k_in = v_in = layer_input
            elif cfg.key_query_shared_bottleneck:
                q_in = k_in = self.bottleneck_attention(x)
                v_in = x
            else:
                q_in = k_in = v_in = x
        else:
            layer_input = q_in = k_in = v_in = x
        query, key = (self.key, self.query) if swap_qk else (self.query, self.key)
        qkv = (query(q_in), key(k_in), self.value(v_in))
        context, scores, probs = multi_head_attention(cfg, *qkv, mask, _sub_rng(rng, 0))
        # transformers applies hidden dropout inside the block only when there is no bottleneck.
        inner_drop = 0.0 if cfg.use_bottleneck else p_hidden
        h = self.attention_output(context, layer_input, inner_drop, _sub_rng(rng, 1))
        for ffn in self.ffn:
            h = ffn(h)
        out = self.output(self.act(self.intermediate(h)), h, inner_drop, _sub_rng(rng, 2))
        if cfg.use_bottleneck:
            out = self.output_bottleneck(out, x, p_hidden, _sub_rng(rng, 3))
        return (out, scores, probs, qkv) if return_qkv else (out, scores, probs)


class Embeddings(nnx.Module):
    """Word (optionally trigram-convolved and projected), position and token-type embeddings, then Norm."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        dt, init = compute_dtype(cfg), nnx.initializers.normal(cfg.initializer_range)
        embed = lambda n, d: nnx.Embed(n, d, dtype=dt, param_dtype=jnp.float32, embedding_init=init, rngs=rngs)
        self.word_embeddings = embed(cfg.vocab_size, cfg.embedding_size)
        if cfg.has_embedding_transformation:
            width = cfg.embedding_size * (3 if cfg.trigram_input else 1)
            self.embedding_transformation = dense(cfg, width, cfg.hidden_size, rngs)
        self.position_embeddings = embed(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = embed(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = norm(cfg, cfg.hidden_size, torch_default_eps=True)

    def __call__(self, input_ids: Array, token_type_ids: Array, rng=None) -> Array:
        cfg = self.cfg
        e = self.word_embeddings(input_ids)
        if cfg.trigram_input:
            # concat(e[t+1], e[t], e[t-1]); zero vectors only beyond the sequence ends, as transformers/official.
            nxt = jnp.pad(e[:, 1:], ((0, 0), (0, 1), (0, 0)))
            prv = jnp.pad(e[:, :-1], ((0, 0), (1, 0), (0, 0)))
            e = jnp.concatenate([nxt, e, prv], axis=-1)
        if cfg.has_embedding_transformation:
            e = self.embedding_transformation(e)
        positions = jnp.arange(input_ids.shape[1])[None, :]
        e = e + self.position_embeddings(positions) + self.token_type_embeddings(token_type_ids)
        return dropout(self.norm(e), cfg.hidden_dropout_prob, rng)


class Encoder(nnx.Module):
    """Embeddings + blocks (+ tanh pooler when `classifier_activation`); `pooled_output` is the [CLS] read-out or,
    with `classifier_pooling='mean'`, the masked mean of the last layer."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, rngs)
        self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_hidden_layers)])
        if cfg.classifier_activation:
            self.pooler = dense(cfg, cfg.hidden_size, cfg.hidden_size, rngs)

    def __call__(self, input_ids: Array, token_type_ids: Optional[Array] = None,
                 attention_mask: Optional[Array] = None, *, rng: Optional[Array] = None,
                 num_layers: Optional[int] = None, return_qkv: bool = False) -> EncoderOutput:
        """Runs the first `num_layers` entries of the layer plan (all by default); dropout only when `rng` is given.

        Progressive knowledge transfer runs the student and the teacher only up to the active layer. `return_qkv`
        adds each layer's Q/K/V projections to the output (`EncoderOutput.qkv`); the other outputs are unchanged.
        """
        if input_ids.shape[1] > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings="
                             f"{self.cfg.max_position_embeddings}; truncate inputs or use a larger model config")
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        plan = self.cfg.plan if num_layers is None else self.cfg.plan[:num_layers]
        x = self.embeddings(input_ids, token_type_ids, _sub_rng(rng, 0))
        hidden, scores, probs, qkv = [x], [], [], ([] if return_qkv else None)
        if self.cfg.scan_layers or self.cfg.remat != "none":
            x = self._run_functional(x, attention_mask, rng, plan, num_layers is not None, hidden, scores, probs, qkv)
        else:
            for n, (layer, swap_qk) in enumerate(plan):
                x, s, p, *rest = self.layers[layer](x, attention_mask, _sub_rng(rng, n + 1), swap_qk, return_qkv)
                hidden.append(x)
                scores.append(s)
                probs.append(p)
                if return_qkv:
                    qkv.append(rest[0])
        if self.cfg.classifier_pooling == "mean":
            pooled = token_mean(x, attention_mask)
        else:
            first = x[:, 0]
            pooled = jnp.tanh(self.pooler(first)) if self.cfg.classifier_activation else first
        return EncoderOutput(x, pooled, tuple(hidden), tuple(scores), tuple(probs),
                             None if qkv is None else tuple(qkv))

    def _run_functional(self, x, mask, rng, plan, explicit_last: bool, hidden: list, scores: list, probs: list,
                        qkv: Optional[list] = None):
        """The plan's blocks as a pure function of their parameter states: `lax.scan` over the stacked states
        (`scan_layers`; with `explicit_last`, the last entry runs outside the scan) and/or `jax.checkpoint` (`remat`).

        A swapped plan entry (SPS) is the same block with its query and key parameters exchanged. Appends to the
        output lists (and to `qkv` when it is a list) and returns the last hidden state.
        """
        graphdef = nnx.graphdef(self.layers[0])
        states = [nnx.state(layer) for layer in self.layers]

        def entry_state(layer: int, swap_qk: bool):
            state = states[layer]
            if swap_qk:
                state = jax.tree.map(lambda v: v, state)
                state["query"], state["key"] = states[layer]["key"], states[layer]["query"]
            return state

        def apply(state, h, site_rng):
            return nnx.merge(graphdef, state)(h, mask, site_rng, return_qkv=qkv is not None)

        if self.cfg.remat == "full":
            apply = jax.checkpoint(apply)
        elif self.cfg.remat == "dots":
            apply = jax.checkpoint(apply, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)

        n_scan = 0
        if self.cfg.scan_layers:
            n_scan = len(plan) - 1 if (explicit_last and len(plan) > 1) else len(plan)
        if n_scan:
            stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[entry_state(i, swap) for i, swap in plan[:n_scan]])

            def body(h, xs):
                state, site = xs
                out = apply(state, h, None if rng is None else jax.random.fold_in(rng, site))
                return out[0], out

            x, (hs, ss, ps, *qs) = jax.lax.scan(body, x, (stacked, jnp.arange(1, n_scan + 1)))
            hidden.extend(hs[i] for i in range(n_scan))
            scores.extend(ss[i] for i in range(n_scan))
            probs.extend(ps[i] for i in range(n_scan))
            if qkv is not None:
                qkv.extend(tuple(t[i] for t in qs[0]) for i in range(n_scan))
        for n in range(n_scan, len(plan)):
            x, s, p, *rest = apply(entry_state(*plan[n]), x, _sub_rng(rng, n + 1))
            hidden.append(x)
            scores.append(s)
            probs.append(p)
            if qkv is not None:
                qkv.append(rest[0])
        return x
