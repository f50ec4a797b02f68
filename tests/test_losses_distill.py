"""Prediction-level losses (MLM/NSP, PD, logit KD, PKD) against naive NumPy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobiledistill import losses as L

B, P, V, C = 3, 4, 11, 3


def _softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def _mlm_batch(seed=0):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(B, P, V)).astype(np.float32) * 2
    t = rng.normal(size=(B, P, V)).astype(np.float32) * 2
    ids = rng.integers(0, V, size=(B, P)).astype(np.int32)
    w = np.ones((B, P), np.float32)
    w[1, 2:] = 0.0  # padded prediction slots
    w[2, 3] = 0.0
    ids[1, 3] = -100  # out-of-range label at a weight-0 slot
    return s, t, ids, w


def np_mlm_distill(s, t, ids, w, alpha, temp):
    num, den = 0.0, 0.0
    for b in range(s.shape[0]):
        for p in range(s.shape[1]):
            if w[b, p] == 0:
                continue
            ls = np.log(_softmax(s[b, p]))
            target = (1 - alpha) * _softmax(np.asarray(t[b, p], np.float64) / temp)
            target[ids[b, p]] += alpha
            num += w[b, p] * -(target * ls).sum()
            den += w[b, p]
    return num / (den + 1e-5)


@pytest.mark.parametrize("alpha,temp", [(0.5, 1.0), (0.0, 2.0), (1.0, 1.0)])
def test_mlm_distill_matches_numpy(alpha, temp):
    s, t, ids, w = _mlm_batch()
    got = L.mlm_distill_loss(s, ids, w, t, alpha=alpha, temperature=temp)
    np.testing.assert_allclose(got, np_mlm_distill(s, t, ids, w, alpha, temp), rtol=1e-5)
    assert np.isfinite(got)


def test_plain_mlm_and_accuracy():
    s, _, ids, w = _mlm_batch(1)
    np.testing.assert_allclose(L.mlm_loss(s, ids, w), np_mlm_distill(s, s, ids, w, 1.0, 1.0), rtol=1e-5)
    ids2 = ids.copy()
    ids2[0, 0] = int(np.argmax(s[0, 0]))
    ids2[0, 1] = (int(np.argmax(s[0, 1])) + 1) % V
    correct = sum(w[b, p] * (np.argmax(s[b, p]) == ids2[b, p]) for b in range(B) for p in range(P))
    np.testing.assert_allclose(L.mlm_accuracy(s, ids2, w), correct / (w.sum() + 1e-5), rtol=1e-6)
    with pytest.raises(ValueError, match="needs teacher_logits"):
        L.mlm_distill_loss(s, ids, w, None, alpha=0.5)


def test_mlm_distill_gradient_vanishes_at_target():
    s, t, ids, w = _mlm_batch(2)
    # alpha = 0: pure distillation, the optimum is student == teacher
    g = jax.grad(lambda x: L.mlm_distill_loss(x, ids, w, t, alpha=0.0))(t)
    assert float(jnp.max(jnp.abs(g))) < 1e-6
    # alpha = 0.5: the optimum is log(target) (up to a constant), not the teacher
    target = 0.5 * jax.nn.softmax(jnp.asarray(t), -1) + 0.5 * jax.nn.one_hot(np.clip(ids, 0, V), V)
    g = jax.grad(lambda x: L.mlm_distill_loss(x, ids, w, t, alpha=0.5))(jnp.log(target))
    assert float(jnp.max(jnp.abs(g))) < 1e-6
    g_t = jax.grad(lambda x: L.mlm_distill_loss(x, ids, w, t, alpha=0.5))(t)
    assert float(jnp.max(jnp.abs(g_t))) > 1e-3
    # weight-0 slots get no gradient, and nothing is NaN with -100 labels
    assert float(jnp.abs(g_t[1, 2:]).sum()) == 0.0 and np.all(np.isfinite(g_t))


def test_nsp_and_cross_entropy():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(B, 2)).astype(np.float32)
    labels = np.array([[0], [1], [1]], np.int32)
    want = np.mean([-np.log(_softmax(logits[b])[labels[b, 0]]) for b in range(B)])
    np.testing.assert_allclose(L.nsp_loss(logits, labels), want, rtol=1e-6)
    ww = np.array([1.0, 0.0, 2.0], np.float32)
    want_w = sum(ww[b] * -np.log(_softmax(logits[b])[labels[b, 0]]) for b in range(B)) / 3.0
    np.testing.assert_allclose(L.cross_entropy(logits, labels[:, 0], ww), want_w, rtol=1e-6)


def _task(seed=4):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(B, C)).astype(np.float32) * 3,
        rng.normal(size=(B, C)).astype(np.float32) * 3,
        rng.integers(0, C, size=(B,)).astype(np.int32),
    )


@pytest.mark.parametrize("temp", [1.0, 4.0])
@pytest.mark.parametrize("t_squared", [False, True])
def test_logit_kd_and_kl_match_numpy(temp, t_squared):
    s, t, _ = _task()
    scale = temp**2 if t_squared else 1.0
    ce = np.mean([-(_softmax(t[b] / temp) * np.log(_softmax(s[b] / temp))).sum() for b in range(B)])
    kl = np.mean(
        [
            (_softmax(t[b] / temp) * (np.log(_softmax(t[b] / temp)) - np.log(_softmax(s[b] / temp)))).sum()
            for b in range(B)
        ]
    )
    np.testing.assert_allclose(L.logit_kd_loss(s, t, temp, t_squared=t_squared), scale * ce, rtol=1e-5)
    np.testing.assert_allclose(L.kl_divergence(s, t, temp, t_squared=t_squared), scale * kl, rtol=1e-5)
    np.testing.assert_allclose(L.kl_divergence(s, t, temp, reduction="elementwise_mean"), kl / C, rtol=1e-5)


def test_logit_kd_default_has_no_t_squared():
    s, t, _ = _task(5)
    np.testing.assert_allclose(L.logit_kd_loss(s, t, 4.0), L.logit_kd_loss(s, t, 4.0, t_squared=True) / 16, rtol=1e-6)


def test_kd_minimum_at_teacher():
    _, t, _ = _task(6)
    assert float(L.kl_divergence(t, t, 3.0)) == 0.0
    for fn in (lambda x: L.logit_kd_loss(x, t, 3.0), lambda x: L.kl_divergence(x, t, 3.0)):
        g = jax.grad(fn)(t)
        assert float(jnp.max(jnp.abs(g))) < 1e-6
    # teacher gets no gradient
    g_t = jax.grad(lambda y: L.logit_kd_loss(t + 1.0, y, 2.0))(t)
    assert float(jnp.abs(g_t).sum()) == 0.0


def test_mse_regression():
    rng = np.random.default_rng(7)
    s, t = rng.normal(size=(B, 1)).astype(np.float32), rng.normal(size=(B, 1)).astype(np.float32)
    np.testing.assert_allclose(L.mse_loss(s, t), np.mean((s.astype(np.float64) - t) ** 2), rtol=1e-6)
    assert float(L.mse_loss(t, t)) == 0.0


def np_normalize(x):
    x = np.asarray(x, np.float64)
    return x / max(np.sqrt((x**2).sum()), 1e-12)


def test_patient_kd_matches_numpy():
    s, t, labels = _task(8)
    rng = np.random.default_rng(9)
    s_cls = [rng.normal(size=(B, 6)).astype(np.float32) for _ in range(3)]
    t_cls = [rng.normal(size=(B, 6)).astype(np.float32) * 5 for _ in range(3)]
    alpha, temp, beta = 0.7, 10.0, 100.0
    ce = np.mean([-np.log(_softmax(s[b])[labels[b]]) for b in range(B)])
    kl = np.mean(
        [
            (_softmax(t[b] / temp) * (np.log(_softmax(t[b] / temp)) - np.log(_softmax(s[b] / temp)))).sum()
            for b in range(B)
        ]
    )
    pt, n = 0.0, 0
    for j in range(3):
        for b in range(B):
            d = np_normalize(s_cls[j][b]) - np_normalize(t_cls[j][b])
            pt += (d**2).sum()
            n += d.size
    pt /= n
    total, terms = L.patient_kd_loss(s, t, labels, s_cls, t_cls, kl_reduction="batchmean")
    np.testing.assert_allclose(terms["ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(terms["kd"], temp**2 * kl, rtol=1e-4)
    np.testing.assert_allclose(terms["patience"], pt, rtol=1e-5)
    np.testing.assert_allclose(total, (1 - alpha) * ce + alpha * temp**2 * kl + beta * pt, rtol=1e-4)


def test_patient_kd_stationary_parts_and_finite_grads():
    s, t, labels = _task(10)
    cls = [np.zeros((B, 6), np.float32), np.ones((B, 6), np.float32)]  # zero vector: safe norm
    assert float(L.cls_patience_loss(cls, cls)) == 0.0
    g_cls = jax.grad(lambda c: L.cls_patience_loss(c, cls))(cls)
    for g in g_cls:
        assert np.all(np.isfinite(g)) and float(jnp.max(jnp.abs(g))) == 0.0
    g = jax.grad(lambda x: L.patient_kd_loss(x, t, labels, cls, cls)[0])(s)
    assert np.all(np.isfinite(g))
    with pytest.raises(ValueError, match="same non-zero number"):
        L.cls_patience_loss(cls, cls[:1])


def test_large_and_masked_logits_finite():
    s, t, ids, w = _mlm_batch(11)
    s = s.copy()
    s[..., 0] = np.finfo(np.float32).min
    t = t.copy()
    t[..., 1] = -np.inf
    loss, g = jax.value_and_grad(lambda x: L.mlm_distill_loss(x, ids, w, t, alpha=0.5))(s)
    assert np.isfinite(loss) and np.all(np.isfinite(g))
