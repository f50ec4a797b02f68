"""Layer-wise transfer losses against naive NumPy loops (with padding), zeros and gradients."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobiledistill import losses as L

B, S, H, HEADS, NL = 2, 5, 8, 2, 3
MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int32)
FMIN = np.finfo(np.float32).min


def _rng(seed=0):
    return np.random.default_rng(seed)


def _hidden(rng, scale=1.0, shift=0.0):
    return (rng.normal(size=(B, S, H)) * scale + shift).astype(np.float32)


def _scores(rng, mask_value="hf"):
    raw = rng.normal(size=(B, HEADS, S, S)).astype(np.float32) * 2
    masked = MASK[:, None, None, :] == 0
    if mask_value == "hf":
        return np.where(masked, raw + FMIN, raw).astype(np.float32)
    if mask_value == "-inf":
        return np.where(masked, -np.inf, raw).astype(np.float32)
    return np.where(masked, np.float32(mask_value), raw).astype(np.float32)


def _out(rng, scale=1.0, mask_value="hf"):
    return types.SimpleNamespace(
        hidden_states=tuple(_hidden(rng, scale * (1 + i), 0.3 * i) for i in range(NL + 1)),
        attention_scores=tuple(_scores(rng, mask_value) for _ in range(NL)),
    )


# ---- naive references (float64, explicit loops) ----


def np_ln(v, eps=1e-12):
    v = v.astype(np.float64)
    mu = v.mean()
    var = ((v - mu) ** 2).mean()
    return (v - mu) / np.sqrt(var + eps)


def np_fmt(t, s, mask, normalize=True):
    tot, n = 0.0, 0
    for b in range(t.shape[0]):
        for i in range(t.shape[1]):
            if mask is not None and mask[b, i] == 0:
                continue
            tv, sv = (np_ln(t[b, i]), np_ln(s[b, i])) if normalize else (t[b, i], s[b, i])
            for d in range(t.shape[2]):
                tot += (float(tv[d]) - float(sv[d])) ** 2
                n += 1
    return tot / n


def np_stats(t, s, mask, kind):
    tot, n = 0.0, 0
    for b in range(t.shape[0]):
        for i in range(t.shape[1]):
            if mask is not None and mask[b, i] == 0:
                continue
            tv, sv = t[b, i].astype(np.float64), s[b, i].astype(np.float64)
            if kind == "beta":
                tot += (tv.mean() - sv.mean()) ** 2
            else:
                tot += abs(tv.var() - sv.var())
            n += 1
    return tot / n


def np_at(t, s, mask, mask_padding=True, mask_keys=True):
    tot, n = 0.0, 0
    for b in range(t.shape[0]):
        for q in range(t.shape[2]):
            if mask_padding and mask[b, q] == 0:
                continue
            for h in range(t.shape[1]):
                keys = [k for k in range(t.shape[3]) if (not mask_keys or mask[b, k] == 1)]
                tr = t[b, h, q, keys].astype(np.float64)
                sr = s[b, h, q, keys].astype(np.float64)
                pt = np.exp(tr - tr.max()) / np.exp(tr - tr.max()).sum()
                ps = np.exp(sr - sr.max()) / np.exp(sr - sr.max()).sum()
                tot += sum(pt[k] * (np.log(pt[k]) - np.log(ps[k])) for k in range(len(keys)) if pt[k] > 0)
            n += 1
    return tot / (n * t.shape[1])


# ---- tests ----


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("mask_padding", [True, False])
def test_fmt_matches_numpy(normalize, mask_padding):
    rng = _rng(1)
    t, s = _hidden(rng, 3.0, 1.0), _hidden(rng)
    got = L.feature_map_transfer(t, s, MASK, normalize=normalize, mask_padding=mask_padding)
    want = np_fmt(t, s, MASK if mask_padding else None, normalize)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_fmt_padding_changes_value():
    rng = _rng(2)
    t, s = _hidden(rng), _hidden(rng)
    s[1, 3:] += 100.0  # garbage at padded positions only
    masked = L.feature_map_transfer(t, s, MASK, normalize=False)
    unmasked = L.feature_map_transfer(t, s, MASK, normalize=False, mask_padding=False)
    np.testing.assert_allclose(masked, np_fmt(t, s, MASK, False), rtol=1e-5)
    assert unmasked > 10 * masked


@pytest.mark.parametrize("kind", ["beta", "gamma"])
@pytest.mark.parametrize("mask_padding", [True, False])
def test_stats_match_numpy(kind, mask_padding):
    rng = _rng(3)
    t, s = _hidden(rng, 2.0, 0.5), _hidden(rng)
    fn = L.mean_transfer if kind == "beta" else L.variance_transfer
    got = fn(t, s, MASK, mask_padding=mask_padding)
    np.testing.assert_allclose(got, np_stats(t, s, MASK if mask_padding else None, kind), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["beta", "gamma"])
def test_official_stats_bug_matches_tf_broadcast(kind):
    # The TF1 code: reduce_mean over the stacked list [L+1, B, S, H] of teacher hidden states, then
    # squared/abs difference broadcast against the student's [B, S, 1] and a mean over everything.
    rng = _rng(4)
    out_t = _out(rng, 2.0)
    s = _hidden(rng)
    stacked = np.stack(out_t.hidden_states).astype(np.float64)
    tm = stacked.mean(-1, keepdims=True)
    sm = s.astype(np.float64).mean(-1, keepdims=True)
    if kind == "beta":
        want = ((tm - sm) ** 2).mean()
    else:
        tv = ((stacked - tm) ** 2).mean(-1, keepdims=True)
        sv = ((s - sm) ** 2).mean(-1, keepdims=True)
        want = np.abs(tv - sv).mean()
    fn = L.mean_transfer_official if kind == "beta" else L.variance_transfer_official
    got = fn(out_t.hidden_states, s, MASK, mask_padding=False)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    per_layer = (L.mean_transfer if kind == "beta" else L.variance_transfer)(
        out_t.hidden_states[2], s, MASK, mask_padding=False
    )
    assert abs(float(got) - float(per_layer)) > 1e-3  # the bug really differs from per-layer
    # with padding masked: mean over teacher layers of the masked per-layer values
    got_m = fn(out_t.hidden_states, s, MASK)
    want_m = np.mean([np_stats(t, s, MASK, kind) for t in out_t.hidden_states])
    np.testing.assert_allclose(got_m, want_m, rtol=1e-5)


@pytest.mark.parametrize("mask_value", ["hf", "-inf", -10000.0])
@pytest.mark.parametrize("mask_padding", [True, False])
def test_attention_transfer_matches_numpy(mask_value, mask_padding):
    rng = _rng(5)
    t, s = _scores(rng, mask_value), _scores(rng, mask_value)
    got = L.attention_transfer(t, s, MASK, mask_padding=mask_padding)
    np.testing.assert_allclose(got, np_at(t, s, MASK, mask_padding), rtol=1e-5, atol=1e-7)


def test_attention_transfer_official_minus6_form():
    # Official "-6" masking keeps masked keys in the softmax unless mask_keys=True removes them.
    rng = _rng(6)
    t, s = _scores(rng, -6.0), _scores(rng, -6.0)
    kept = L.attention_transfer(t, s, MASK, mask_keys=False)
    np.testing.assert_allclose(kept, np_at(t, s, MASK, True, mask_keys=False), rtol=1e-5)
    removed = L.attention_transfer(t, s, MASK)
    np.testing.assert_allclose(removed, np_at(t, s, MASK, True, mask_keys=True), rtol=1e-5)
    assert abs(float(kept) - float(removed)) > 1e-4


def test_layer_transfer_loss_matches_numpy():
    rng = _rng(7)
    to, so = _out(rng, 2.0), _out(rng)
    w = {"fmt": 100.0, "at": 1.0, "beta": 5000.0, "gamma": 5.0}
    total, terms = L.layer_transfer_loss(to, so, [0, 2], w, MASK)
    want = {
        "fmt": np.mean([np_fmt(to.hidden_states[k + 1], so.hidden_states[k + 1], MASK) for k in (0, 2)]),
        "at": np.mean([np_at(to.attention_scores[k], so.attention_scores[k], MASK) for k in (0, 2)]),
        "beta": np.mean([np_stats(to.hidden_states[k + 1], so.hidden_states[k + 1], MASK, "beta") for k in (0, 2)]),
        "gamma": np.mean([np_stats(to.hidden_states[k + 1], so.hidden_states[k + 1], MASK, "gamma") for k in (0, 2)]),
    }
    for k in want:
        np.testing.assert_allclose(terms[k], want[k], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(total, sum(w[k] * want[k] for k in w), rtol=1e-5)
    # official scale: sum over active layers / total layer count
    t24, terms24 = L.layer_transfer_loss(to, so, [1], w, MASK, layer_normalizer=24)
    _, terms1 = L.layer_transfer_loss(to, so, [1], w, MASK)
    for k in w:
        np.testing.assert_allclose(terms24[k], terms1[k] / 24, rtol=1e-6)
    # zero weights are not computed; (teacher, student) pairs
    _, only = L.layer_transfer_loss(to, so, [(2, 0)], {"fmt": 1.0, "at": 0.0}, MASK)
    assert set(only) == {"fmt"}
    np.testing.assert_allclose(only["fmt"], np_fmt(to.hidden_states[3], so.hidden_states[1], MASK), rtol=1e-5)


def test_layer_transfer_official_bug_flag():
    rng = _rng(8)
    to, so = _out(rng, 2.0), _out(rng)
    _, terms = L.layer_transfer_loss(
        to, so, [1], {"beta": 1.0, "gamma": 1.0}, MASK, official_stats_bug=True, mask_padding=False
    )
    np.testing.assert_allclose(
        terms["beta"],
        L.mean_transfer_official(to.hidden_states, so.hidden_states[2], MASK, mask_padding=False),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        terms["gamma"],
        L.variance_transfer_official(to.hidden_states, so.hidden_states[2], MASK, mask_padding=False),
        rtol=1e-6,
    )


def test_bad_weight_key_is_rejected():
    rng = _rng(9)
    with pytest.raises(ValueError, match="unknown weight keys"):
        L.layer_transfer_loss(_out(rng), _out(rng), [0], {"fmtt": 1.0})


def test_zero_when_student_equals_teacher():
    rng = _rng(10)
    o = _out(rng, 3.0)
    total, terms = L.layer_transfer_loss(o, o, [0, 1, 2], None, MASK)
    assert float(total) == 0.0 and all(float(v) == 0.0 for v in terms.values())
    _, terms = L.layer_transfer_loss(o, o, [0, 1, 2], None, MASK, normalize=False, mask_padding=False)
    assert all(float(v) == 0.0 for v in terms.values())


@pytest.mark.parametrize("mask_value", ["hf", "-inf"])
def test_gradients_finite(mask_value):
    rng = _rng(11)
    to, so = _out(rng, 2.0, mask_value), _out(rng, 1.0, mask_value)
    so.hidden_states = (
        so.hidden_states[:1] + (np.zeros((B, S, H), np.float32),) + so.hidden_states[2:]
    )  # constant rows: LN at zero variance

    def f(hs, sc):
        s = types.SimpleNamespace(hidden_states=hs, attention_scores=sc)
        return L.layer_transfer_loss(to, s, [0, 1, 2], None, MASK)[0]

    gh, gs = jax.grad(f, argnums=(0, 1))(so.hidden_states, so.attention_scores)
    for g in jax.tree.leaves((gh, gs)):
        assert np.all(np.isfinite(g))
    assert float(jnp.abs(gs[0]).sum()) > 0
    # masked keys and padded query rows receive no gradient
    assert float(jnp.abs(gs[0][1, :, :, 3:]).sum()) == 0.0
    assert float(jnp.abs(gs[0][1, :, 3:, :]).sum()) == 0.0
    assert float(jnp.abs(gh[1][1, 3:]).sum()) == 0.0
    # at student == teacher the gradient vanishes
    g0 = jax.grad(
        lambda hs, sc: L.layer_transfer_loss(
            to, types.SimpleNamespace(hidden_states=hs, attention_scores=sc), [0, 1, 2], None, MASK
        )[0],
        argnums=(0, 1),
    )(to.hidden_states, to.attention_scores)
    for g in jax.tree.leaves(g0):
        assert np.all(np.isfinite(g)) and float(jnp.max(jnp.abs(g))) < 1e-4


def test_bf16_inputs_computed_in_float32():
    rng = _rng(12)
    t, s = _hidden(rng), _hidden(rng)
    got = L.feature_map_transfer(jnp.asarray(t, jnp.bfloat16), jnp.asarray(s, jnp.bfloat16), MASK)
    assert got.dtype == jnp.float32
    ref = np_fmt(
        np.asarray(jnp.asarray(t, jnp.bfloat16), np.float32), np.asarray(jnp.asarray(s, jnp.bfloat16), np.float32), MASK
    )
    np.testing.assert_allclose(got, ref, rtol=1e-5)


@pytest.mark.parametrize("mask_value", ["hf", "-inf"])
def test_attention_transfer_without_mask_tolerates_masked_scores(mask_value):
    # No attention_mask given: the -inf / finfo.min columns must still give p = 0, finite grads.
    rng = _rng(13)
    t, s = _scores(rng, mask_value), _scores(rng, mask_value)
    val, g = jax.value_and_grad(lambda x: L.attention_transfer(t, x, None))(s)
    np.testing.assert_allclose(val, np_at(t, s, MASK, mask_padding=False), rtol=1e-5)
    assert np.all(np.isfinite(g))
    val_k, g_k = jax.value_and_grad(lambda x: L.attention_transfer(t, x, MASK, mask_keys=False))(s)
    np.testing.assert_allclose(val_k, np_at(t, s, MASK), rtol=1e-5)
    assert np.all(np.isfinite(g_k))
