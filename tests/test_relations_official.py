"""CKD relations and Pea-KD's KD term, default (official) reductions, against references written line by line from
the official code:

- CKD: github GeondoPark/CKD, `loss.py` (WR_Dist 77-133, WR_Angle_window 171-209 with `window_index` 29-38,
  LTR_Dist 215-282, LTR_Angle 287-314) and `utils.py` (`matching_alignment`, 'emb+skip': 71-76), called as
  `glue_train.py` 450-502 does with the README's published setting: distance 'cos', lossfunc_d 'kldiv',
  lossfunc_a 'l2loss', window 21, matching 'emb+skip' for WR and LTR.
- Pea-KD: github cih23/PeaKD, `utils/KD_loss.py` (`distillation_loss` 7-20, `patience_loss` 22-28), called by
  `NLI_KD_training.py` 322-328.

The references are NumPy (float64), transcribed from those lines with PyTorch semantics (`F.normalize` eps 1e-12,
`masked_fill(-inf)`, `F.softmax`, `F.kl_div(reduction='sum')`, `/ mask.sum()`). One deliberate difference, the
value of the pair losses: the official forward value is NaN on every batch (`F.kl_div` of a -inf log-probability
against a zero target on the masked diagonal, and softmax over the all -inf rows of padded tokens), while its
gradient is finite and equal to the gradient of the sum over the finite entries. The references therefore sum
the finite entries (`np.nansum`), which is the quantity whose gradient the official code follows.
"""

import math

import jax
import numpy as np
import pytest

from mobiledistill import finetune
from mobiledistill import losses as L
from mobiledistill.losses.relations import RELATION_TERMS

RTOL = 1e-5
WT, WS = 32, 24  # teacher / student widths
NT, NS = 7, 4  # hidden states: a 6-layer teacher, a 3-layer student (emb+skip matches 4 of each)


# ---------------------------------------------------------------------------------------------------------------
# transcriptions of the official code (NumPy, PyTorch semantics)
# ---------------------------------------------------------------------------------------------------------------

def _normalize(x, axis):  # F.normalize(x, p=2, dim=axis), eps 1e-12
    return x / np.maximum(np.sqrt((x * x).sum(axis, keepdims=True)), 1e-12)


def _softmax(x):  # F.softmax(dim=-1); an all -inf row gives NaN, as in PyTorch
    with np.errstate(invalid="ignore"):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)


def _log_softmax(x):
    with np.errstate(invalid="ignore"):
        m = x.max(-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _kl_div_sum(s_d, t_d):  # F.kl_div(input=s_d, target=t_d, reduction='sum'), finite entries (see docstring)
    with np.errstate(invalid="ignore", divide="ignore"):
        elem = np.where(t_d > 0, t_d * np.log(np.where(t_d > 0, t_d, 1.0)), 0.0) - t_d * s_d
    return np.nansum(elem)


def matching_emb_skip(t_hidden, s_hidden):  # utils.py:71-76 -> [B, Lm, S, H]
    gcd = math.gcd(len(t_hidden) - 1, len(s_hidden) - 1)
    step_t, step_s = (len(t_hidden) - 1) // gcd, (len(s_hidden) - 1) // gcd
    t = np.stack([t_hidden[0]] + list(t_hidden[step_t::step_t]), axis=1)
    s = np.stack([s_hidden[0]] + list(s_hidden[step_s::step_s]), axis=1)
    return t.astype(np.float64), s.astype(np.float64)


def _masked_cos_rows(x, mask, n):  # the cos branch of WR_Dist / LTR_Dist before the softmax (loss.py:86-91)
    x = _normalize(x, 2)
    d = (x @ x.transpose(0, 2, 1)) * mask
    diagonal = np.ones((n, n)) - np.eye(n)
    d = np.where(diagonal == 0, -np.inf, d)
    return np.where(mask == 0, -np.inf, d)


def wr_dist_cos_kldiv(t_embed, s_embed, attention_mask):  # loss.py:77-133
    bsz, layer_num, max_len, dim = t_embed.shape
    t = t_embed.reshape(-1, max_len, dim)
    s = s_embed.reshape(-1, max_len, s_embed.shape[-1])
    mask = (attention_mask[:, :, None] * attention_mask[:, None, :])[:, None].repeat(layer_num, 1)
    mask = mask.reshape(-1, max_len, max_len).astype(np.float64)
    t_d = _softmax(_masked_cos_rows(t, mask, max_len)) * mask
    s_d = _log_softmax(_masked_cos_rows(s, mask, max_len)) * mask
    return _kl_div_sum(s_d, t_d) / mask.sum()


def window_index(w_size, bsz, length):  # loss.py:29-38 (torch.range is inclusive)
    w2 = (w_size - 1) / 2
    idx = np.arange(length)[None, :, None].repeat(bsz, 0).repeat(w_size, 2)
    idx = idx + np.arange(-w2, w2 + 1)[None, None, :]
    idx = np.clip(idx, 0, length - 1)
    return (idx + np.arange(bsz).reshape(-1, 1, 1) * length).astype(np.int64)


def wr_angle_window_l2(t_embed, s_embed, attention_mask, window):  # loss.py:171-209
    assert window % 2 == 1
    bsz, layer_num, max_len, dim = t_embed.shape
    t = t_embed.reshape(-1, max_len, dim)
    s = s_embed.reshape(-1, max_len, s_embed.shape[-1])
    new_bsz = bsz * layer_num
    idx = window_index(window, new_bsz, max_len)
    t_round = t.reshape(new_bsz * max_len, -1)[idx, :]
    s_round = s.reshape(new_bsz * max_len, -1)[idx, :]
    mask = attention_mask[:, :, None, None].repeat(window, 2).repeat(window, 3)
    mask = mask[:, None].repeat(layer_num, 1).reshape(-1, max_len, window, window).astype(np.float64)

    def angles(x, x_round):
        sub = _normalize(x[:, :, None, :] - x_round, 3).reshape(-1, window, x.shape[-1])
        return (sub @ sub.transpose(0, 2, 1)).reshape(new_bsz, max_len, window, window) * mask

    return ((angles(s, s_round) - angles(t, t_round)) ** 2).sum() / mask.sum()


def ltr_dist_cos_kldiv(t_embed, s_embed, attention_mask):  # loss.py:215-282
    bsz, layer_num, max_len, dim = t_embed.shape
    t = t_embed.transpose(0, 2, 1, 3).reshape(-1, layer_num, dim)
    s = s_embed.transpose(0, 2, 1, 3).reshape(-1, layer_num, s_embed.shape[-1])
    mask = attention_mask[:, :, None, None].repeat(layer_num, 2).repeat(layer_num, 3)
    mask = mask.reshape(-1, layer_num, layer_num).astype(np.float64)
    t_d = _softmax(_masked_cos_rows(t, mask, layer_num)) * mask
    s_d = _log_softmax(_masked_cos_rows(s, mask, layer_num)) * mask
    return _kl_div_sum(s_d, t_d) / mask.sum()


def ltr_angle_l2(t_embed, s_embed, attention_mask):  # loss.py:287-314
    bsz, layer_num, max_len, dim = t_embed.shape
    t = t_embed.transpose(0, 2, 1, 3).reshape(-1, layer_num, dim)
    s = s_embed.transpose(0, 2, 1, 3).reshape(-1, layer_num, s_embed.shape[-1])
    mask = attention_mask[:, :, None, None, None].repeat(layer_num, 2).repeat(layer_num, 3).repeat(layer_num, 4)
    mask = mask.reshape(-1, layer_num, layer_num, layer_num).astype(np.float64)

    def angles(x):
        sub = _normalize(x[:, None] - x[:, :, None], 3).reshape(-1, layer_num, x.shape[-1])
        return (sub @ sub.transpose(0, 2, 1)).reshape(-1, layer_num, layer_num, layer_num) * mask

    return ((angles(s) - angles(t)) ** 2).sum() / mask.sum()


def peakd_distillation_loss(y, labels, teacher_scores, T, alpha):  # KD_loss.py:7-20, reduction_kd='mean'
    log_p_s = _log_softmax(y / T)
    p_t = _softmax(teacher_scores / T)
    d_loss = np.mean(p_t * (np.log(p_t) - log_p_s)) * T * T  # nn.KLDivLoss(reduction='mean'): / (B * C)
    nll_loss = -np.mean(_log_softmax(y)[np.arange(len(labels)), labels])
    return alpha * d_loss + (1.0 - alpha) * nll_loss, d_loss, nll_loss


def peakd_patience_loss(teacher_patience, student_patience):  # KD_loss.py:22-28, normalized_patience=True
    return np.mean((_normalize(teacher_patience, 2) - _normalize(student_patience, 2)) ** 2)


# ---------------------------------------------------------------------------------------------------------------
# data: padded batches of unequal lengths, widths 32 vs 24, 7 vs 4 hidden states
# ---------------------------------------------------------------------------------------------------------------

def _batch(seq, seed):
    rng = np.random.default_rng(seed)
    lengths = [seq, seq - 3, seq // 2, 5, 1] if seq > 8 else [seq, 3, 1]
    mask = np.array([[1] * n + [0] * (seq - n) for n in lengths], np.int32)
    b = len(lengths)

    def states(n, width):  # padded positions hold ordinary (non-zero) encoder outputs, as in a real model
        return [(rng.normal(size=(b, seq, width)) * rng.uniform(0.5, 2.0, size=(b, seq, 1))).astype(np.float32)
                for _ in range(n)]

    return states(NT, WT), states(NS, WS), mask


def _terms(t_states, s_states, mask, **params):
    spec = {name: {"weight": 1.0, **params.get(name, {})} for name in RELATION_TERMS}
    _, terms = L.build_loss(spec)({"hidden_states": t_states}, {"hidden_states": s_states}, {"attention_mask": mask})
    return {k: float(v) for k, v in terms.items()}


def _official(t_states, s_states, mask, window=21):
    t, s = matching_emb_skip(t_states, s_states)
    return {"wr_pair": wr_dist_cos_kldiv(t, s, mask), "wr_angle": wr_angle_window_l2(t, s, mask, window),
            "ltr_pair": ltr_dist_cos_kldiv(t, s, mask), "ltr_angle": ltr_angle_l2(t, s, mask)}


@pytest.mark.parametrize("seq", [16, 48])
def test_ckd_relations_equal_the_official_code(seq):
    t_states, s_states, mask = _batch(seq, seed=seq)
    assert L.match_layers(NT - 1, NS - 1) == ((0, 2, 4, 6), (0, 1, 2, 3))
    got = _terms(t_states, s_states, mask)
    want = _official(t_states, s_states, mask)
    for name in RELATION_TERMS:
        np.testing.assert_allclose(got[name], want[name], rtol=RTOL, err_msg=name)
    # the masked-mean alternative really is a different quantity (by the factors the docstrings name)
    mm = _terms(t_states, s_states, mask, **{n: {"reduction": "masked_mean"} for n in RELATION_TERMS})
    n_real = mask.sum(1)
    np.testing.assert_allclose(mm["wr_pair"] / got["wr_pair"], (n_real ** 2).sum() / n_real.sum(), rtol=RTOL)
    np.testing.assert_allclose(mm["ltr_pair"] / got["ltr_pair"], 4, rtol=RTOL)  # x Lm
    np.testing.assert_allclose(mm["ltr_angle"] / got["ltr_angle"], 4 ** 3 / (4 * 3 ** 2), rtol=RTOL)


def test_wr_angle_official_window_clamps_into_padding_and_chunks_agree():
    t_states, s_states, mask = _batch(16, seed=3)
    for window in (5, 21):
        want = _official(t_states, s_states, mask, window)["wr_angle"]
        for chunk in (None, 7):
            got = _terms(t_states, s_states, mask, wr_angle={"window": window, "chunk_size": chunk})["wr_angle"]
            np.testing.assert_allclose(got, want, rtol=RTOL, err_msg=f"window {window} chunk {chunk}")
    # the official window holds padded positions: changing a padded student state changes the loss
    s_moved = [x.copy() for x in s_states]
    s_moved[-1][1, -1] += 5.0  # sequence 1 has 13 real tokens: position 15 is in the windows of 5..12
    assert _terms(t_states, s_moved, mask)["wr_angle"] != pytest.approx(_terms(t_states, s_states, mask)["wr_angle"])
    with pytest.raises(ValueError, match="must be odd"):
        L.make_loss("wr_angle", window=20)


def test_official_gradient_is_that_of_the_finite_sum():
    """The JAX gradient of the default WR pair loss equals the NumPy reference's numerical gradient."""
    t_states, s_states, mask = _batch(16, seed=5)
    t, s = matching_emb_skip(t_states, s_states)

    def ours(x):
        return L.wr_pair_loss(t_states[2], x, mask)

    g = np.asarray(jax.grad(ours)(s_states[1]))
    rng = np.random.default_rng(0)
    for _ in range(5):
        b, p, h = rng.integers(0, 5), rng.integers(0, int(mask[0].sum())), rng.integers(0, WS)
        b = int(b) if mask[int(b), int(p)] else 0
        e = np.zeros_like(s_states[1], dtype=np.float64)
        e[b, p, h] = 1e-4
        x = s_states[1].astype(np.float64)
        f = lambda y: wr_dist_cos_kldiv(t[:, 1:2], y[:, None], mask)  # noqa: E731
        num = (f(x + e) - f(x - e)) / 2e-4
        np.testing.assert_allclose(g[b, p, h], num, rtol=2e-3, atol=1e-6)


def test_peakd_kd_term_equals_the_official_code():
    """configs/peakd.py's PKD stage loss == alpha * KLDivLoss('mean') * T^2 + (1 - alpha) * CE + beta * patience."""
    import importlib.util

    spec_file = importlib.util.spec_from_file_location("peakd_cfg", "configs/peakd.py")
    mod = importlib.util.module_from_spec(spec_file)
    spec_file.loader.exec_module(mod)
    pkd = mod.get_config("task=rte,teacher=finetune:/nowhere").pkd
    spec, cacheable = finetune.loss_spec(pkd, "classification", 2, teacher=object())
    assert not cacheable and spec["kl_kd"]["reduction"] == "elementwise_mean"
    rng = np.random.default_rng(7)
    b, classes = 6, 2
    s_logits, t_logits = rng.normal(size=(2, b, classes)).astype(np.float32) * 3
    labels = rng.integers(0, classes, size=b)
    hs = [rng.normal(size=(b, 4, WS)).astype(np.float32) for _ in range(3)]
    ht = [rng.normal(size=(b, 4, WS)).astype(np.float32) for _ in range(3)]
    student = {"logits": s_logits, "hidden_states": hs}
    teacher = {"logits": t_logits, "hidden_states": ht}
    total, terms = L.build_loss(spec)(teacher, student, {"labels": labels})
    sl, tl = spec["patience"]["student_layers"], spec["patience"]["teacher_layers"]
    kd_total, d_loss, nll = peakd_distillation_loss(s_logits.astype(np.float64), labels, t_logits.astype(np.float64),
                                                    T=10.0, alpha=0.7)
    pt = peakd_patience_loss(np.stack([ht[i][:, 0] for i in tl], 1).astype(np.float64),
                             np.stack([hs[i][:, 0] for i in sl], 1).astype(np.float64))
    np.testing.assert_allclose(float(terms["kl_kd"]), d_loss, rtol=RTOL)
    np.testing.assert_allclose(float(total), kd_total + 100.0 * pt, rtol=RTOL)
    # and the function form
    got, parts = L.patient_kd_loss(s_logits, t_logits, labels, [hs[i][:, 0] for i in sl], [ht[i][:, 0] for i in tl])
    np.testing.assert_allclose(float(got), kd_total + 100.0 * pt, rtol=RTOL)
    np.testing.assert_allclose(float(parts["kd"]), d_loss, rtol=RTOL)
