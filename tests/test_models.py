"""Encoder family: sizes, FLOPs, bf16, dropout, masks, partial depth, layer plans, config errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mobiledistill.models import (Encoder, PreTrainingModel, SequenceClassificationModel, SpanModel, abstract_params,
                                  count_params, encoder_param_count, forward_flops, preset)


@pytest.mark.slow
def test_exact_backbone_sizes():
    assert encoder_param_count(preset("mobilebert")) == 24_581_888
    assert encoder_param_count(preset("mobilebert_tiny")) == 15_485_696
    # IB-BERT_LARGE, counted without allocation: 294,205,184 backbone + 262,656 pooler.
    assert encoder_param_count(preset("ib_bert_large")) == 294_467_840
    assert encoder_param_count(preset("ib_bert_large", classifier_activation=False)) == 294_205_184
    assert encoder_param_count(preset("bert_base")) == 109_482_240  # BertModel with pooler
    # MobileBERT with MLM + NSP heads: ~36.6M, of which the MLM head ~12.0M.
    full = count_params(abstract_params(lambda: PreTrainingModel(preset("mobilebert"), nnx.Rngs(0))))
    assert full == 36_597_564


@pytest.mark.parametrize("name,paper", [("mobilebert", 5.7e9), ("mobilebert_tiny", 3.1e9), ("bert_base", 22.5e9)])
def test_analytic_flops_near_paper(name, paper):
    flops = forward_flops(preset(name), 128, pooler=False)
    assert abs(flops - paper) / paper < 0.10, flops


@pytest.mark.parametrize("name", [pytest.param("mobilebert", marks=pytest.mark.slow), "mobilebert_tiny"])
def test_analytic_flops_match_xla_cost_analysis(name):
    cfg = preset(name)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Encoder(cfg, nnx.Rngs(0))))
    ids = jax.ShapeDtypeStruct((1, 128), jnp.int32)

    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids).sequence_output

    cost = jax.jit(forward).lower(state, ids).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    analytic = forward_flops(cfg, 128)
    assert abs(cost["flops"] - analytic) / analytic < 0.05, (cost["flops"], analytic)


@pytest.mark.slow
def test_bf16_full_size_close_to_fp32():
    """bf16 compute with f32 parameters: finite, and within 3% (relative to the output scale) of fp32."""
    cfg32 = preset("mobilebert")
    m32 = Encoder(cfg32, nnx.Rngs(0))
    m16 = Encoder(cfg32.replace(dtype="bfloat16"), nnx.Rngs(1))
    nnx.update(m16, nnx.state(m32, nnx.Param))
    ids = jax.random.randint(jax.random.key(0), (2, 64), 1, cfg32.vocab_size)
    a = m32(ids)
    b = m16(ids)
    assert b.sequence_output.dtype == jnp.bfloat16
    assert m16.embeddings.word_embeddings.embedding.get_value().dtype == jnp.float32
    x, y = np.asarray(a.sequence_output, np.float64), np.asarray(b.sequence_output, np.float64)
    assert np.isfinite(y).all()
    rel = np.max(np.abs(x - y)) / np.max(np.abs(x))
    assert rel < 0.03, rel
    np.testing.assert_allclose(np.asarray(b.attention_probs[-1]), np.asarray(a.attention_probs[-1]), atol=0.02)


def test_ib_bert_reduced_size_shapes():
    cfg = preset("test_ib_bert")
    assert cfg.true_hidden_size == 64 and cfg.hidden_size == 32
    model = PreTrainingModel(cfg, nnx.Rngs(0))
    ids = jnp.ones((2, 9), jnp.int32)
    mlm, nsp, out = model(ids, masked_positions=jnp.array([[1, 2], [3, 4]]))
    assert mlm.shape == (2, 2, cfg.vocab_size) and nsp.shape == (2, 2)
    assert [h.shape for h in out.hidden_states] == [(2, 9, 32)] * 3
    assert out.attention_scores[0].shape == (2, cfg.num_attention_heads, 9, 9)
    # Q, K, V read the 32-d block input and produce the 64-d attention width.
    assert model.encoder.layers[0].query.kernel.shape == (32, 64)


def test_gathered_mlm_equals_full_mlm():
    cfg = preset("test_mobilebert")
    model = PreTrainingModel(cfg, nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (2, 12), 1, cfg.vocab_size)
    pos = jnp.array([[0, 5, 11], [2, 2, 7]])
    full, _, _ = model(ids)
    gathered, _, _ = model(ids, masked_positions=pos)
    np.testing.assert_allclose(gathered, jnp.take_along_axis(full, pos[..., None], 1), rtol=1e-6, atol=1e-6)


def test_dropout_only_with_rng_and_reproducible():
    cfg = preset("test_bert")
    model = Encoder(cfg, nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (2, 12), 1, cfg.vocab_size)
    det1, det2 = model(ids).sequence_output, model(ids).sequence_output
    np.testing.assert_array_equal(det1, det2)
    d1 = model(ids, rng=jax.random.key(5)).sequence_output
    d2 = model(ids, rng=jax.random.key(5)).sequence_output
    d3 = model(ids, rng=jax.random.key(6)).sequence_output
    np.testing.assert_array_equal(d1, d2)
    assert not np.allclose(d1, det1) and not np.allclose(d1, d3)


def test_dropout_keeps_the_rate_in_both_halves_of_each_random_word_and_rescales():
    from mobiledistill.models.encoder import dropout
    x = jnp.ones((64, 4097), jnp.float32)  # an odd last dimension: the last word's second half is unused
    y = np.asarray(dropout(x, 0.1, jax.random.key(3)))
    assert set(np.unique(y).tolist()) == {0.0, np.float32(1 / 0.9)}
    kept = y != 0
    sigma = np.sqrt(0.09 / kept.size)
    assert abs(kept.mean() - 0.9) < 5 * sigma
    for half in (kept[:, 0::2], kept[:, 1::2]):  # the low and the high 16 bits of each 32-bit word
        assert abs(half.mean() - 0.9) < 5 * np.sqrt(0.09 / half.size)
    other = np.asarray(dropout(x, 0.1, jax.random.key(4))) != 0
    agree = 0.9 ** 2 + 0.1 ** 2  # independent keys, independent masks
    assert abs((kept == other).mean() - agree) < 5 * np.sqrt(agree * (1 - agree) / kept.size)
    assert np.asarray(dropout(x, 0.5, jax.random.key(3)) != 0).mean() == pytest.approx(0.5, abs=5 * 0.5 / 512)


def test_mask_value_forms():
    ids = jnp.array([[2, 3, 4, 0, 0]])
    mask = jnp.array([[1, 1, 1, 0, 0]])
    off = Encoder(preset("test_mobilebert", attention_mask_value=-6), nnx.Rngs(0))
    hf = Encoder(preset("test_mobilebert"), nnx.Rngs(0))
    s_off = off(ids, attention_mask=mask).attention_scores[0]
    s_hf = hf(ids, attention_mask=mask).attention_scores[0]
    np.testing.assert_array_equal(s_off[..., 3:], -6.0)
    assert np.all(np.asarray(s_hf[..., 3:]) < -1e30)
    np.testing.assert_allclose(s_off[..., :3], s_hf[..., :3])
    assert np.all(np.asarray(hf(ids, attention_mask=mask).attention_probs[0][..., 3:]) == 0.0)


def test_gelu_forms_differ():
    a = Encoder(preset("test_bert"), nnx.Rngs(0))
    b = Encoder(preset("test_bert", hidden_act="gelu_new"), nnx.Rngs(0))
    ids = jnp.array([[5, 6, 7, 8]])
    x, y = a(ids).sequence_output, b(ids).sequence_output
    assert not np.array_equal(x, y) and np.allclose(x, y, atol=1e-2)


def test_partial_depth_is_a_prefix_of_the_full_run():
    cfg = preset("test_mobilebert", num_hidden_layers=4)
    model = Encoder(cfg, nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (2, 7), 1, cfg.vocab_size)
    full = model(ids)
    part = model(ids, num_layers=2)
    assert len(part.hidden_states) == 3 and len(part.attention_probs) == 2
    for a, b in zip(part.hidden_states, full.hidden_states):
        np.testing.assert_array_equal(a, b)


def test_layer_plan_reuses_parameters_and_swaps_qk():
    base = preset("test_mobilebert", num_hidden_layers=2)
    sps = base.replace(layer_plan=((0, False), (1, False), (0, True), (1, True)))
    assert encoder_param_count(sps) == encoder_param_count(base)
    model = Encoder(sps, nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (1, 6), 1, sps.vocab_size)
    out = model(ids)
    assert len(out.hidden_states) == 5
    # Layer 0 swapped on hidden state 2 gives transposed scores of layer 0 unswapped on the same input.
    x = out.hidden_states[2]
    mask = jnp.ones((1, 6), jnp.int32)
    _, s_plain, _ = model.layers[0](x, mask)
    np.testing.assert_allclose(out.attention_scores[2], jnp.swapaxes(s_plain, -1, -2), rtol=1e-5, atol=1e-5)


def test_task_heads_shapes():
    cfg = preset("test_mobilebert")
    ids = jnp.ones((3, 8), jnp.int32)
    logits, _ = SequenceClassificationModel(cfg, 3, nnx.Rngs(0))(ids)
    start, end, _ = SpanModel(cfg, nnx.Rngs(0))(ids)
    assert logits.shape == (3, 3) and start.shape == end.shape == (3, 8)


@pytest.mark.parametrize("overrides,match", [
    (dict(hidden_act="swish"), "hidden_act='swish'; valid"),
    (dict(normalization_type="batch_norm"), "normalization_type"),
    (dict(dtype="float16"), "float16 overflows"),
    (dict(num_attention_heads=3), "not divisible by num_attention_heads=3"),
    (dict(layer_plan=((5, False),)), "layer_plan index 5"),
    (dict(attention_mask_value="zero"), "attention_mask_value"),
])
def test_bad_config_is_one_clear_line(overrides, match):
    with pytest.raises(ValueError, match=match) as e:
        preset("test_mobilebert", **overrides)
    assert "\n" not in str(e.value)


def test_too_long_input_is_refused():
    model = Encoder(preset("test_mobilebert"), nnx.Rngs(0))
    with pytest.raises(ValueError, match="sequence length 65 exceeds max_position_embeddings=64"):
        model(jnp.ones((1, 65), jnp.int32))


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown model preset 'mobilebert_huge'; valid: bert_base"):
        preset("mobilebert_huge")
    with pytest.raises(ValueError, match=r"unknown encoder config field\(s\) \['hiden_size'\]"):
        preset("mobilebert", hiden_size=3)


@pytest.mark.parametrize("w_shape", [(16, 40), (40, 16)])
@pytest.mark.parametrize("shape,dtype", [((24, 16), "float32"), ((3, 8, 16), "float32"), ((3, 8, 16), "bfloat16")])
def test_linear_weight_gradient_orientation_equals_autodiff(shape, dtype, w_shape):
    """`linear_dot_general` (every dense layer's matmul) computes dW on CPU in the orientation whose result has the
    fewer rows ((g^T x)^T when out < in, x^T g otherwise): same gradients as plain autodiff, and the compiled
    backward pass holds the [min, max] dot only."""
    from mobiledistill.models.encoder import linear_dot_general
    from mobiledistill.perf import hlo_dots

    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, shape[:-1] + (w_shape[0],)).astype(dtype)
    w = jax.random.normal(kw, w_shape).astype(dtype)
    dims = (((len(shape) - 1,), (0,)), ((), ()))

    def loss(dot, x, w):
        return jnp.sum(jnp.tanh(dot(x, w, dims)).astype(jnp.float32) ** 2)

    ours = jax.grad(functools.partial(loss, linear_dot_general), argnums=(0, 1))
    plain = jax.grad(functools.partial(loss, jax.lax.dot_general), argnums=(0, 1))
    for a, b in zip(ours(x, w), plain(x, w)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6, atol=1e-6)
    weight_grad = jax.jit(jax.grad(functools.partial(loss, linear_dot_general), argnums=1))
    outs = [d["out"] for d in hlo_dots(weight_grad.lower(x, w).compile().as_text())]
    assert (16, 40) in outs and (40, 16) not in outs
