"""CKD relation losses (WR / LTR), `reduction='masked_mean'`, against naive full O(n^3) NumPy loops, with padding and
window clamping. The official reductions (the default) are tested against the official code in
tests/test_relations_official.py; the zero / invariance / gradient / registry tests here run both."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobiledistill import losses as L

B, S, HT, HS = 3, 13, 6, 4
# right padding (len 13, 8) and left padding (len 4 < window): clamping at both ends and a short sequence
MASK = np.array([[1] * 13, [1] * 8 + [0] * 5, [0] * 9 + [1] * 4], np.int32)
EPS = 1e-8
TOL = dict(rtol=1e-5, atol=1e-6)
MM = dict(reduction="masked_mean")


def _h(rng, width, n=S):
    return (rng.normal(size=(B, n, width)) * rng.uniform(0.5, 2.0, size=(B, n, 1))).astype(np.float32)


def _pair(seed=0):
    rng = np.random.default_rng(seed)
    return _h(rng, HT), _h(rng, HS)


# ---------------------------------------------------------------------------------------------------------------
# naive references (float64, loops over everything, masks applied afterwards)
# ---------------------------------------------------------------------------------------------------------------

def _unit(v):
    n = np.linalg.norm(v)
    return v / max(n, EPS)


def _log_softmax(x):
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def np_pair_kl(t_sets, s_sets, valid_sets):
    """t_sets: list of [N, H] arrays (one per set), valid_sets: list of [N] bools. Mean KL over valid rows."""
    total, rows = 0.0, 0
    for t, s, v in zip(t_sets, s_sets, valid_sets):
        n = len(v)
        for i in range(n):
            if not v[i]:
                continue
            keys = [j for j in range(n) if v[j] and j != i]
            rows += 1
            if not keys:
                continue
            ct = np.array([_unit(t[i]) @ _unit(t[j]) for j in keys])
            cs = np.array([_unit(s[i]) @ _unit(s[j]) for j in keys])
            lt, ls = _log_softmax(ct), _log_softmax(cs)
            total += np.sum(np.exp(lt) * (lt - ls))
    return total / max(rows, 1)


def np_pair_distance(t_sets, s_sets, valid_sets, loss):
    total, count = 0.0, 0
    for t, s, v in zip(t_sets, s_sets, valid_sets):
        idx = [i for i in range(len(v)) if v[i]]
        pairs = [(i, j) for i in idx for j in idx if i != j]
        if not pairs:
            continue
        dt = {p: np.linalg.norm(t[p[0]] - t[p[1]]) for p in pairs}
        ds = {p: np.linalg.norm(s[p[0]] - s[p[1]]) for p in pairs}
        mt, ms = np.mean(list(dt.values())), np.mean(list(ds.values()))
        for p in pairs:
            x = ds[p] / ms - dt[p] / mt
            total += {"l2": x * x, "l1": abs(x), "huber": 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5}[loss]
            count += 1
    return total / max(count, 1)


def np_window(valid_row, i, window):
    """Positions in the window of center i (the clamping rule documented in `window_bounds`)."""
    n = len(valid_row)
    w = min(window, n)
    real = np.flatnonzero(valid_row)
    lo, hi = (real[0], real[-1] + 1) if len(real) else (0, n)
    start = min(max(i - window // 2, lo), hi - w)
    start = min(max(start, 0), n - w)
    return set(range(start, start + w))


def np_angle(r, i, j, k):
    return _unit(r[j] - r[i]) @ _unit(r[k] - r[i])


def np_wr_angle(t, s, mask, window):
    """All (i, j, k) triples computed, then the window / padding / j,k != i masks applied."""
    total, count = 0.0, 0
    for b in range(t.shape[0]):
        n = t.shape[1]
        for i in range(n):
            win = np_window(mask[b], i, window)
            for j in range(n):
                for k in range(n):
                    err = (np_angle(s[b], i, j, k) - np_angle(t[b], i, j, k)) ** 2
                    if mask[b, i] and mask[b, j] and mask[b, k] and j != i and k != i and j in win and k in win:
                        total += err
                        count += 1
    return total / max(count, 1)


def np_ltr_angle(t_layers, s_layers, mask):
    t, s = np.stack(t_layers, 2), np.stack(s_layers, 2)  # [B, S, n, H]
    n = t.shape[2]
    total, count = 0.0, 0
    for b in range(t.shape[0]):
        for p in range(t.shape[1]):
            if not mask[b, p]:
                continue
            for c in range(n):
                for m in range(n):
                    for k in range(n):
                        if m != c and k != c:
                            total += (np_angle(s[b, p], c, m, k) - np_angle(t[b, p], c, m, k)) ** 2
                            count += 1
    return total / max(count, 1)


def _wr_sets(t, s, mask):
    return list(t.astype(np.float64)), list(s.astype(np.float64)), list(mask > 0)


def _ltr_sets(t_layers, s_layers, mask):
    t, s = np.stack(t_layers, 2), np.stack(s_layers, 2)
    ts, ss, vs = [], [], []
    for b in range(t.shape[0]):
        for p in range(t.shape[1]):
            ts.append(t[b, p].astype(np.float64))
            ss.append(s[b, p].astype(np.float64))
            vs.append(np.full(t.shape[2], bool(mask[b, p])))
    return ts, ss, vs


# ---------------------------------------------------------------------------------------------------------------
# layer matching
# ---------------------------------------------------------------------------------------------------------------

def test_match_layers_presets():
    assert L.match_layers(12, 6) == ((0, 2, 4, 6, 8, 10, 12), (0, 1, 2, 3, 4, 5, 6))
    assert L.match_layers(24, 24) == (tuple(range(25)), tuple(range(25)))
    assert L.match_layers(6, 3) == ((0, 2, 4, 6), (0, 1, 2, 3))
    assert L.match_layers(12, 4, "emb+skip") == ((0, 3, 6, 9, 12), (0, 1, 2, 3, 4))
    assert L.match_layers(12, 8) == ((0, 3, 6, 9, 12), (0, 2, 4, 6, 8))  # gcd 4
    assert L.match_layers(12, 5) == ((0, 12), (0, 5))
    assert L.match_layers(12, 6, "skip") == ((2, 4, 6, 8, 10, 12), (1, 2, 3, 4, 5, 6))
    assert L.match_layers(24, 4, "last") == ((24,), (4,))
    assert L.match_layers(12, 4, "uniform") == ((3, 6, 9, 12), (1, 2, 3, 4))
    assert L.match_layers(12, 8, "uniform") == ((2, 3, 5, 6, 8, 9, 11, 12), tuple(range(1, 9)))
    assert L.match_layers(np.int64(24), 24, "uniform") == (tuple(range(1, 25)), tuple(range(1, 25)))
    assert L.match_layers(6, 12) == ((0, 1, 2, 3, 4, 5, 6), (0, 2, 4, 6, 8, 10, 12))  # deeper (e.g. SPS) student
    with pytest.raises(ValueError, match="no deeper"):
        L.match_layers(6, 12, "uniform")
    with pytest.raises(ValueError, match="unknown preset"):
        L.match_layers(12, 6, "every")
    with pytest.raises(ValueError, match="positive"):
        L.match_layers(0, 6)


def test_window_bounds_clamping():
    mask = np.ones((1, 30), np.int32)
    start, w = L.window_bounds(mask, 1, 30, 21)
    assert w == 21 and int(start[0, 0]) == 0 and int(start[0, 15]) == 5 and int(start[0, 29]) == 9
    start, w = L.window_bounds(MASK, B, S, 5)
    assert w == 5
    assert list(np.asarray(start[1, :8])) == [0, 0, 0, 1, 2, 3, 3, 3]  # right padding: stays in [0, 8)
    assert list(np.asarray(start[2, 9:])) == [8, 8, 8, 8]  # 4 real tokens < 5: the window ends at the last one
    start, w = L.window_bounds(None, 2, 7, 21)
    assert w == 7 and not np.any(np.asarray(start))


# ---------------------------------------------------------------------------------------------------------------
# equality with the naive references
# ---------------------------------------------------------------------------------------------------------------

def test_wr_pair_cosine_matches_numpy():
    t, s = _pair(0)
    np.testing.assert_allclose(L.wr_pair_loss(t, s, MASK, **MM), np_pair_kl(*_wr_sets(t, s, MASK)), **TOL)
    ones = np.ones_like(MASK)
    np.testing.assert_allclose(L.wr_pair_loss(t, s, **MM), np_pair_kl(*_wr_sets(t, s, ones)), **TOL)


@pytest.mark.parametrize("loss", ["huber", "l1", "l2"])
def test_wr_pair_distance_matches_numpy(loss):
    t, s = _pair(1)
    s = s * 0.3  # differences across the Huber knee
    got = L.wr_pair_loss(t, s, MASK, kind="distance", distance_loss=loss, **MM)
    np.testing.assert_allclose(got, np_pair_distance(*_wr_sets(t, s, MASK), loss), **TOL)


@pytest.mark.parametrize("window,chunk", [(5, None), (5, 4), (21, None), (4, None)])
def test_wr_angle_matches_numpy(window, chunk):
    t, s = _pair(2)
    got = L.wr_angle_loss(t, s, MASK, window=window, chunk_size=chunk, **MM)
    np.testing.assert_allclose(got, np_wr_angle(t, s, MASK, window), **TOL)


def _layers(seed, n, width):
    rng = np.random.default_rng(seed)
    return [_h(rng, width) for _ in range(n)]


@pytest.mark.parametrize("kind,loss", [("cosine", "huber"), ("distance", "huber"), ("distance", "l2")])
def test_ltr_pair_matches_numpy(kind, loss):
    tl, sl = _layers(3, 4, HT), _layers(4, 4, HS)
    got = L.ltr_pair_loss(tl, sl, MASK, kind=kind, distance_loss=loss, **MM)
    sets = _ltr_sets(tl, sl, MASK)
    want = np_pair_kl(*sets) if kind == "cosine" else np_pair_distance(*sets, loss)
    np.testing.assert_allclose(got, want, **TOL)


def test_ltr_angle_matches_numpy():
    tl, sl = _layers(5, 4, HT), _layers(6, 4, HS)
    np.testing.assert_allclose(L.ltr_angle_loss(tl, sl, MASK, **MM), np_ltr_angle(tl, sl, MASK), **TOL)


@pytest.mark.parametrize("reduction", ["official", "masked_mean"])
def test_jit_matches_eager(reduction):
    t, s = _pair(7)
    fn = jax.jit(lambda a, b, m: L.wr_angle_loss(a, b, m, window=5, chunk_size=5, reduction=reduction))
    np.testing.assert_allclose(fn(t, s, MASK), L.wr_angle_loss(t, s, MASK, window=5, reduction=reduction), **TOL)


# ---------------------------------------------------------------------------------------------------------------
# zeros, scale invariance, gradients
# ---------------------------------------------------------------------------------------------------------------

def _all_losses(t_states, s_states, mask, window=5, reduction="official"):
    r = dict(reduction=reduction)
    return {
        "wr_pair": L.wr_pair_loss(t_states[-1], s_states[-1], mask, **r),
        "wr_dist": L.wr_pair_loss(t_states[-1], s_states[-1], mask, kind="distance", distance_loss="l1", **r),
        "wr_angle": L.wr_angle_loss(t_states[-1], s_states[-1], mask, window=window, **r),
        "ltr_pair": L.ltr_pair_loss(t_states, s_states, mask, **r),
        "ltr_dist": L.ltr_pair_loss(t_states, s_states, mask, kind="distance", **r),
        "ltr_angle": L.ltr_angle_loss(t_states, s_states, mask, **r),
    }


@pytest.mark.parametrize("reduction", ["official", "masked_mean"])
def test_zero_for_identical_and_scaled_student(reduction):
    tl = _layers(8, 3, HT)
    for name, v in _all_losses(tl, tl, MASK, reduction=reduction).items():
        assert abs(float(v)) < 1e-6, name
    scaled = [x * 3.0 for x in tl]  # every relation is scale invariant (distances are mean-normalised)
    for name, v in _all_losses(tl, scaled, MASK, reduction=reduction).items():
        assert abs(float(v)) < 1e-5, name
    other = _layers(9, 3, HS)
    for name, v in _all_losses(tl, other, MASK, reduction=reduction).items():
        assert float(v) > 1e-4, name


def _grads(t_states, s_states, mask, reduction):
    def total(ss, name):
        return _all_losses(t_states, ss, mask, reduction=reduction)[name]
    return {n: jax.grad(total)(list(s_states), n) for n in _all_losses(t_states, s_states, mask)}


@pytest.mark.parametrize("reduction", ["official", "masked_mean"])
def test_gradients_finite_with_padding_and_zero_vectors(reduction):
    tl, sl = _layers(10, 3, HT), _layers(11, 3, HS)
    for x in tl + sl:
        x[0, 2] = 0.0  # zero token vectors (real tokens)
        x[1, 3:5] = 0.0  # two identical (zero) neighbours: zero differences in the angles
        x[1, 9:] = 1e3  # large values at padded positions
    sl[0][0, 5] = 0.0
    for name, g in _grads(tl, sl, MASK, reduction).items():
        flat = np.concatenate([np.ravel(x) for x in g])
        assert np.all(np.isfinite(flat)), name
        assert np.abs(flat).max() > 0, name
        if name == "wr_angle" and reduction == "official":
            continue  # the official window reaches into the padding: padded neighbours get a gradient
        for x in g:  # padded tokens get no gradient
            assert np.all(np.asarray(x)[MASK == 0] == 0), name
    # at the optimum (student == teacher) the gradient vanishes. Not checked with zero vectors: the safe norm's
    # gradient there is 1/eps, which turns float32 rounding of P_S - P_T into O(1) (still finite) values.
    same = [x[..., :HS].copy() for x in _layers(12, 3, HT)]
    for x in same:
        x[1, 9:] = 1e3
    for name, g in _grads(same, same, MASK, reduction).items():
        assert max(float(jnp.max(jnp.abs(x))) for x in g) < 1e-5, name


# ---------------------------------------------------------------------------------------------------------------
# registry terms and the task-specific total
# ---------------------------------------------------------------------------------------------------------------

def _out(seed, n_layers, width, classes=3):
    rng = np.random.default_rng(seed)
    return types.SimpleNamespace(hidden_states=tuple(_h(rng, width) for _ in range(n_layers + 1)),
                                 logits=rng.normal(size=(B, classes)).astype(np.float32))


def test_registry_terms_match_direct_calls():
    t, s = _out(12, 4, HT), _out(13, 2, HS)
    batch = {"attention_mask": MASK}
    ti, si = L.match_layers(4, 2)  # (0, 2, 4) vs (0, 1, 2)
    tl, sl = [t.hidden_states[i] for i in ti], [s.hidden_states[i] for i in si]
    spec = {"wr_pair": {"weight": 2.0}, "wr_angle": {"weight": 3.0, "window": 5},
            "ltr_pair": {"weight": 4.0}, "ltr_angle": {"weight": 5.0},
            "wr_last": {"loss": "wr_pair", "matching": "last", "kind": "distance"},
            "ltr_explicit": {"loss": "ltr_pair", "layers": [(1, 0), (3, 1), (4, 2)]}}
    total, terms = L.build_loss(spec)(t, s, batch)
    want = {
        "wr_pair": np.mean([L.wr_pair_loss(a, b, MASK) for a, b in zip(tl, sl)]),
        "wr_angle": np.mean([L.wr_angle_loss(a, b, MASK, window=5) for a, b in zip(tl, sl)]),
        "ltr_pair": L.ltr_pair_loss(tl, sl, MASK),
        "ltr_angle": L.ltr_angle_loss(tl, sl, MASK),
        "wr_last": L.wr_pair_loss(t.hidden_states[4], s.hidden_states[2], MASK, kind="distance"),
        "ltr_explicit": L.ltr_pair_loss([t.hidden_states[i] for i in (1, 3, 4)], sl, MASK),
    }
    for k, v in want.items():
        np.testing.assert_allclose(terms[k], v, rtol=1e-6, err_msg=k)
    np.testing.assert_allclose(total, sum(w * want[k] for k, w in zip(want, (2, 3, 4, 5, 1, 1))), rtol=1e-6)
    with pytest.raises(ValueError, match="'last' gives one"):
        L.make_loss("ltr_angle", matching="last")
    with pytest.raises(ValueError, match="kind"):
        L.make_loss("wr_pair", kind="dot")
    with pytest.raises(ValueError, match="unknown matching"):
        L.make_loss("wr_angle", matching="all")
    with pytest.raises(ValueError, match="at least 3"):
        L.ltr_angle_loss(tl[:2], sl[:2], MASK)
    with pytest.raises(ValueError, match="out of range"):
        L.make_loss("wr_pair", layers=[(9, 0)])(t, s, batch)


def test_ckd_task_weights_and_total():
    hp = L.ckd_task_hparams("SST-2")
    assert hp == {"wr_pair": 100.0, "wr_angle": 1000.0, "ltr_pair": 100.0, "ltr_angle": 1000.0,
                  "temperature": 4.0, "lr": 4e-5, "epochs": 4}
    table = {"cola": (1, 10, 3, 5e-5, 4), "sst2": (100, 1000, 4, 4e-5, 4), "rte": (1, 10, 3, 5e-5, 6),
             "qnli": (10, 1, 3, 4e-5, 4), "mrpc": (1, 1, 4, 3e-5, 4), "stsb": (0.1, 0.1, 1, 5e-5, 4),
             "mnli": (100, 1, 4, 4e-5, 4), "qqp": (10, 10, 2, 5e-5, 4)}
    for task, (wp, wa, temp, lr, ep) in table.items():
        assert L.CKD_TASK_HPARAMS[task] == {"wr_pair": wp, "wr_angle": wa, "ltr_pair": wp, "ltr_angle": wa,
                                            "temperature": temp, "lr": lr, "epochs": ep}
    t, s = _out(14, 4, HT), _out(15, 2, HS)
    batch = {"attention_mask": MASK}
    total, terms = L.ckd_task_loss("cola", window=5)(t, s, batch)
    kd = L.logit_kd_loss(s.logits, t.logits, 3.0)
    np.testing.assert_allclose(terms["kd"], kd, rtol=1e-6)
    want = kd + terms["wr_pair"] + 10 * terms["wr_angle"] + terms["ltr_pair"] + 10 * terms["ltr_angle"]
    np.testing.assert_allclose(total, want, rtol=1e-6)
    spec = L.ckd_task_loss_spec("sts-b")
    assert spec["kd"]["loss"] == "regression_kd" and spec["ltr_angle"]["weight"] == 0.1
    assert L.ckd_task_loss_spec("mnli-mm", ce_weight=1.0)["ce"]["loss"] == "task_ce"
    assert set(L.ckd_relation_spec({"wr_pair": 1.0, "ltr_angle": 0.0})) == {"wr_pair"}
    with pytest.raises(ValueError, match="unknown CKD task"):
        L.ckd_task_hparams("squad")
