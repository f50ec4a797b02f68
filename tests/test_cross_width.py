"""Any teacher, any student shape (issue 16): projected FMT, MiniLMv2 attention relations, Q/K/V outputs.

The losses are checked against naive NumPy loops on padded batches of unequal lengths, with a teacher 32 wide with
4 heads and a student 24 wide with 2 heads.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mobiledistill.losses import registry, transfer
from mobiledistill.models import PreTrainingModel, preset
from mobiledistill.strategies import init_from_teacher, truncated_svd

LENGTHS = (7, 4, 2)
B, S, DT, DS = len(LENGTHS), 7, 32, 24


def mask():
    return (np.arange(S)[None] < np.array(LENGTHS)[:, None]).astype(np.int32)


def rand(seed, *shape, scale=1.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# NumPy references (float64 loops)
# ---------------------------------------------------------------------------------------------------------------

def np_layer_norm(x, eps=1e-12):
    x = np.asarray(x, np.float64)
    return (x - x.mean()) / np.sqrt(x.var() + eps)


def np_projected_fmt(t, s, w, b, m, normalize=True, mask_padding=True):
    num, den = 0.0, 0
    for i in range(t.shape[0]):
        for j in range(t.shape[1]):
            if mask_padding and not m[i, j]:
                continue
            p = np.asarray(s[i, j], np.float64) @ np.asarray(w, np.float64) + b
            tt = np.asarray(t[i, j], np.float64)
            if normalize:
                tt, p = np_layer_norm(tt), np_layer_norm(p)
            num += np.mean((tt - p) ** 2)
            den += 1
    return num / den


def np_log_softmax(x):
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def np_relations(qkv_t, qkv_s, m, heads, types=("qq", "kk", "vv"), mask_padding=True):
    total = 0.0
    for r in types:
        a_t, a_s = qkv_t["qkv".index(r[0])], qkv_s["qkv".index(r[0])]
        num, den = 0.0, 0
        for i in range(a_t.shape[0]):
            valid = np.flatnonzero(m[i])
            for q in range(a_t.shape[1]):
                if mask_padding and not m[i, q]:
                    continue
                kl = 0.0
                for h in range(heads):
                    rows = []
                    for a in (a_t, a_s):
                        a = np.asarray(a[i], np.float64)
                        d = a.shape[-1] // heads
                        part = a[:, h * d:(h + 1) * d]
                        rows.append(np_log_softmax(part[valid] @ part[q] / np.sqrt(d)))
                    lt, ls = rows
                    kl += np.sum(np.exp(lt) * (lt - ls))
                num += kl / heads
                den += 1
        total += num / den
    return total


# ---------------------------------------------------------------------------------------------------------------
# Projected feature-map transfer
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("normalize, mask_padding", [(True, True), (False, True), (True, False)])
def test_projected_fmt_equals_numpy(normalize, mask_padding):
    t, s = rand(0, B, S, DT), rand(1, B, S, DS)
    w, b = rand(2, DS, DT, scale=DS ** -0.5), rand(3, DT, scale=0.1)
    m = mask()
    got = transfer.projected_feature_map_transfer(t, s, w, b, m, normalize=normalize, mask_padding=mask_padding)
    want = np_projected_fmt(t, s, w, b, m, normalize, mask_padding)
    assert float(got) == pytest.approx(want, rel=1e-5)
    # padded positions do not count when masked: garbage there leaves the loss unchanged
    if mask_padding:
        s2 = np.where(m[..., None] > 0, s, 1e3).astype(np.float32)
        again = transfer.projected_feature_map_transfer(t, s2, w, b, m, normalize=normalize)
        assert float(again) == pytest.approx(float(got), rel=1e-6)


def test_projected_fmt_is_zero_for_the_identity_projection_and_trains_the_projection():
    t = rand(0, B, S, DT)
    eye, zero = np.eye(DT, dtype=np.float32), np.zeros(DT, np.float32)
    assert float(transfer.projected_feature_map_transfer(t, t, eye, zero, mask())) < 1e-10
    s, w = rand(1, B, S, DS), rand(2, DS, DT, scale=DS ** -0.5)
    grads = jax.grad(lambda tt, ss, ww: transfer.projected_feature_map_transfer(tt, ss, ww, None, mask()),
                     argnums=(0, 1, 2))(t, s, w)
    assert float(jnp.abs(grads[0]).max()) == 0.0  # the teacher is a constant
    assert float(jnp.abs(grads[1]).max()) > 0 and float(jnp.abs(grads[2]).max()) > 0


def test_projected_fmt_rejects_a_wrong_kernel_in_one_line():
    with pytest.raises(ValueError, match=r"student width 24 needs a kernel \[24, d_teacher\].*got kernel \(32, 32\)"):
        transfer.projected_feature_map_transfer(rand(0, B, S, DT), rand(1, B, S, DS), np.eye(DT), None, mask())


def test_layer_transfer_fmt_term_uses_the_stage_projection():
    """The registry's fmt term with projection=True reads student_out['projections'][hidden-state index]."""
    t_h = tuple(rand(i, B, S, DT) for i in range(3))
    s_h = tuple(rand(10 + i, B, S, DS) for i in range(3))
    w, b = rand(20, DS, DT, scale=DS ** -0.5), np.zeros(DT, np.float32)
    student = dict(hidden_states=s_h, projections={"2": {"kernel": w, "bias": b}})
    batch = dict(attention_mask=mask())
    fn = registry.make_loss("fmt", layers=[[1, 1]], projection=True)
    want = np_projected_fmt(t_h[2], s_h[2], w, b, mask())
    assert float(fn(dict(hidden_states=t_h), student, batch)) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match=r"no projection for student hidden state 1 \(have \['2'\]\)"):
        registry.make_loss("fmt", layers=[[0, 0]], projection=True)(dict(hidden_states=t_h), student, batch)


# ---------------------------------------------------------------------------------------------------------------
# Attention relations across head counts
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("heads, types", [(4, ("qq", "kk", "vv")), (2, ("qq", "kk", "vv")), (8, ("vv",))])
def test_attention_relations_equal_numpy(heads, types):
    qkv_t = tuple(rand(i, B, S, DT) for i in range(3))
    qkv_s = tuple(rand(5 + i, B, S, DS) for i in range(3))
    m = mask()
    got = transfer.attention_relation_transfer(qkv_t, qkv_s, m, num_relation_heads=heads, relations=types)
    assert float(got) == pytest.approx(np_relations(qkv_t, qkv_s, m, heads, types), rel=1e-5)
    unmasked = transfer.attention_relation_transfer(qkv_t, qkv_s, m, num_relation_heads=heads, relations=types,
                                                    mask_padding=False)
    assert float(unmasked) == pytest.approx(np_relations(qkv_t, qkv_s, m, heads, types, mask_padding=False),
                                            rel=1e-5)


def test_attention_relations_are_zero_at_student_equal_teacher_and_reject_bad_heads():
    qkv = tuple(rand(i, B, S, DT) for i in range(3))
    assert abs(float(transfer.attention_relation_transfer(qkv, qkv, mask(), num_relation_heads=4))) < 1e-6
    qkv_s = tuple(rand(5 + i, B, S, DS) for i in range(3))
    with pytest.raises(ValueError, match=r"num_relation_heads=16 must divide both Q/K/V widths \(teacher 32, "
                                         r"student 24\)"):
        transfer.attention_relation_transfer(qkv, qkv_s, mask(), num_relation_heads=16)
    with pytest.raises(ValueError, match=r"relations=\['qk'\]; valid: a non-empty subset of \['qq', 'kk', 'vv'\]"):
        transfer.attention_relation_transfer(qkv, qkv, mask(), num_relation_heads=4, relations=["qk"])


def _batch(vocab):
    m = mask()
    ids = np.random.default_rng(0).integers(5, vocab, (B, S)).astype(np.int32) * m
    return dict(input_ids=ids, attention_mask=m, token_type_ids=np.zeros_like(ids))


@pytest.mark.parametrize("scan", [False, True])
def test_encoder_qkv_output_and_the_registry_term_on_real_models(scan):
    """A 4-head, 32-wide BERT teacher and a 2-head MobileBERT student (attention width 16): Q/K/V come out only when
    asked, the other outputs are unchanged, and `attn_relation` equals the NumPy reference on them."""
    t_cfg = preset("test_bert", num_attention_heads=4, scan_layers=scan)
    s_cfg = preset("test_mobilebert", scan_layers=scan)
    teacher, student = PreTrainingModel(t_cfg, nnx.Rngs(0)), PreTrainingModel(s_cfg, nnx.Rngs(1))
    batch = _batch(t_cfg.vocab_size)
    run = lambda model, qkv: model.encoder(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                                           return_qkv=qkv)
    plain, t_out, s_out = run(teacher, False), run(teacher, True), run(student, True)
    assert plain.qkv is None and len(t_out.qkv) == 2 and len(s_out.qkv) == 2
    for a, b in zip(jax.tree.leaves((plain.hidden_states, plain.attention_scores)),
                    jax.tree.leaves((t_out.hidden_states, t_out.attention_scores))):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert t_out.qkv[0][0].shape == (B, S, 32) and s_out.qkv[1][2].shape == (B, S, 16)
    # the scores the model used are the per-head products of these queries and keys
    q, k = np.asarray(t_out.qkv[1][0]), np.asarray(t_out.qkv[1][1])
    want = np.einsum("bqd,bkd->bqk", q[..., 8:16], k[..., 8:16]) / np.sqrt(8)
    got = np.asarray(t_out.attention_scores[1][:, 1])
    valid = np.broadcast_to(mask()[:, None, :] > 0, got.shape)
    np.testing.assert_allclose(got[valid], want[valid], rtol=1e-4, atol=1e-5)
    fn = registry.make_loss("attn_relation", num_relation_heads=2)  # uniform mapping: 0 -> 0, 1 -> 1
    value = float(fn(t_out, s_out, batch))
    np_t = [tuple(np.asarray(x) for x in layer) for layer in t_out.qkv]
    np_s = [tuple(np.asarray(x) for x in layer) for layer in s_out.qkv]
    want = np.mean([np_relations(np_t[i], np_s[i], mask(), 2) for i in range(2)])
    assert value == pytest.approx(want, rel=1e-3)  # float32 KL of near-uniform relations (small init)
    one = registry.make_loss("attn_relation", num_relation_heads=4, layers=[[1, 0]], relations=["vv"])
    assert float(one(t_out, s_out, batch)) == pytest.approx(np_relations(np_t[1], np_s[0], mask(), 4, ("vv",)),
                                                            rel=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# Student embeddings from a teacher of another width
# ---------------------------------------------------------------------------------------------------------------

def test_truncated_svd_error_equals_numpy():
    a = rand(0, 97, 32) @ np.diag(np.linspace(2.0, 0.05, 32)).astype(np.float32)
    factor, basis, err = truncated_svd(a, 12)
    a64 = a.astype(np.float64)
    s = np.linalg.svd(a64, compute_uv=False)
    assert err == pytest.approx(np.sqrt(np.sum(s[12:] ** 2) / np.sum(s ** 2)), rel=1e-9)
    assert err == pytest.approx(np.linalg.norm(a64 - factor @ basis) / np.linalg.norm(a64), rel=1e-9)
    np.testing.assert_allclose(basis @ basis.T, np.eye(12), atol=1e-12)  # orthonormal rows
    f2, b2, e2 = truncated_svd(a, 40)  # more room than columns: exact
    assert e2 == 0.0 and np.array_equal(f2 @ b2, a64)


def _embedding_output(cfg, state, batch):
    model = nnx.merge(nnx.graphdef(PreTrainingModel(cfg, nnx.Rngs(0))), state)
    return np.asarray(model.encoder(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                                    num_layers=1).hidden_states[0], np.float64)


@pytest.mark.parametrize("student_hidden", [32, 24])
def test_svd_init_matches_the_teachers_embedding_output(student_hidden):
    """A NoNorm teacher (embedding 32) whose word table has rank 16 plus noise, and a student with embedding 16:
    the student's initial embedding output (NoNorm = identity at init) is the teacher's, in the student's basis."""
    t_cfg = preset("test_mobilebert", embedding_size=32)
    s_cfg = preset("test_mobilebert", embedding_size=16, hidden_size=student_hidden)
    t_state = nnx.state(PreTrainingModel(t_cfg, nnx.Rngs(0)), nnx.Param)
    low_rank = rand(1, 97, 16) @ rand(2, 16, 32) * 0.1 + rand(3, 97, 32, scale=1e-4)
    t_state["encoder"]["embeddings"]["word_embeddings"]["embedding"].set_value(jnp.asarray(low_rank))
    s_state = nnx.state(PreTrainingModel(s_cfg, nnx.Rngs(1)), nnx.Param)
    out, report = init_from_teacher(s_state, t_state, s_cfg, t_cfg)
    sv = np.linalg.svd(low_rank.astype(np.float64), compute_uv=False)
    assert report["svd_relative_error"] == pytest.approx(np.sqrt(np.sum(sv[16:] ** 2) / np.sum(sv ** 2)), rel=1e-6)
    assert report["svd_relative_error"] < 1e-3
    batch = _batch(97)
    t_emb, s_emb = _embedding_output(t_cfg, t_state, batch), _embedding_output(s_cfg, out, batch)
    word = np.asarray(out["encoder"]["embeddings"]["word_embeddings"]["embedding"].get_value())
    assert word.shape == (97, 16)
    if student_hidden == 32:  # same feature-map width: the same embedding output
        assert np.linalg.norm(s_emb - t_emb) / np.linalg.norm(t_emb) < 2e-3
        assert report["heads"] == ("copied where shapes match; student initialisation: "
                                   "['mlm/extra_output_weights']")
    else:  # narrower: the teacher's output in the top-24 principal basis Q (orthonormal columns)
        r = np.random.default_rng(4)  # enough tokens (8 x 32 > 32) to pin the linear map down
        ids = r.integers(5, 97, (8, 32)).astype(np.int32)
        many = dict(input_ids=ids, attention_mask=np.ones_like(ids), token_type_ids=r.integers(0, 2, ids.shape))
        t_emb, s_emb = (_embedding_output(t_cfg, t_state, many).reshape(-1, 32),
                        _embedding_output(s_cfg, out, many).reshape(-1, 24))
        q = np.linalg.lstsq(t_emb, s_emb, rcond=None)[0]
        assert np.linalg.norm(t_emb @ q - s_emb) / np.linalg.norm(s_emb) < 2e-3
        np.testing.assert_allclose(q.T @ q, np.eye(24), atol=5e-3)
        assert np.linalg.norm(s_emb) > 0.8 * np.linalg.norm(t_emb)  # most of the teacher's output is kept
        assert report["heads"].startswith("copied where shapes match; student initialisation: ['mlm/")
        assert "nsp/kernel" in report["heads"]
    # the embedding norm and the layers keep the student's own initialisation
    for path in ("norm", "scale"), ("norm", "bias"):
        assert np.array_equal(np.asarray(out["encoder"]["embeddings"][path[0]][path[1]].get_value()),
                              np.asarray(s_state["encoder"]["embeddings"][path[0]][path[1]].get_value()))


def test_equal_shapes_are_copied_and_impossible_inits_refused_in_one_line():
    t_cfg, s_cfg = preset("test_ib_bert"), preset("test_mobilebert")
    t_state = nnx.state(PreTrainingModel(t_cfg, nnx.Rngs(0)), nnx.Param)
    s_state = nnx.state(PreTrainingModel(s_cfg, nnx.Rngs(1)), nnx.Param)
    out, report = init_from_teacher(s_state, t_state, s_cfg, t_cfg)
    assert report["embeddings"] == "copied" and report["svd_relative_error"] == 0.0
    assert np.array_equal(np.asarray(out["encoder"]["embeddings"]["word_embeddings"]["embedding"].get_value()),
                          np.asarray(t_state["encoder"]["embeddings"]["word_embeddings"]["embedding"].get_value()))
    other = preset("test_mobilebert", vocab_size=101, hidden_size=24)
    o_state = nnx.state(PreTrainingModel(other, nnx.Rngs(1)), nnx.Param)
    with pytest.raises(ValueError, match=r"^cannot initialise the student from a teacher of another width: "
                                         r"vocab_size student 101 vs teacher 97$"):
        init_from_teacher(o_state, t_state, other, t_cfg)
