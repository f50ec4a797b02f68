"""Any teacher, any student shape (issue 16): projected FMT, MiniLMv2 attention relations, Q/K/V outputs.

The losses are checked against naive NumPy loops on padded batches of unequal lengths, with a teacher 32 wide with
4 heads and a student 24 wide with 2 heads.
"""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from flax import nnx

from mobiledistill import steps
from mobiledistill.losses import registry, transfer
from mobiledistill.models import PreTrainingModel, preset
from mobiledistill.strategies import build_stages, init_from_teacher, projection, truncated_svd

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


# ---------------------------------------------------------------------------------------------------------------
# Layer-wise stages with a teacher of another width and head count
# ---------------------------------------------------------------------------------------------------------------

def _cross_models(layers=2):
    """Teacher: IB-BERT-shaped, feature map 32, 4 heads. Student: MobileBERT-shaped, feature map 24, 2 heads."""
    return (preset("test_ib_bert", num_hidden_layers=layers, num_attention_heads=4, **NO_DROPOUT),
            preset("test_mobilebert", num_hidden_layers=layers, hidden_size=24))


NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def test_strategies_accept_other_widths_with_projections_and_relations():
    from test_engine import make_config

    teacher_cfg, student_cfg = _cross_models(4)
    student_cfg = student_cfg.replace(num_hidden_layers=2)
    stages = build_stages(make_config("progressive"), teacher_cfg, student_cfg)
    assert [s.name for s in stages] == ["teacher", "pkt_00", "pkt_01", "pd"]
    pkt = stages[2]
    assert pkt.projections == (2,) and pkt.losses["fmt"]["projection"] is True
    assert "at" not in pkt.losses and pkt.losses["attn_relation"]["layers"] == [[3, 1]]
    assert pkt.losses["attn_relation"]["num_relation_heads"] == 4  # divides 64 and 16
    assert pkt.optimizer.lr_scales[0] == ("^projections/", 1.0)
    assert stages[3].projections == ()  # PD: no layer-wise terms, nothing to project
    jkt = build_stages(make_config("joint"), teacher_cfg, student_cfg)[1]
    assert jkt.projections == (1, 2) and jkt.losses["fmt"]["layers"] == [[1, 0], [3, 1]]
    # equal widths and heads: the per-head AT and the plain FMT, no projections
    same = build_stages(make_config("joint"), teacher_cfg.replace(hidden_size=24, num_attention_heads=2),
                        student_cfg)[1]
    assert same.projections == () and "at" in same.losses and "projection" not in same.losses["fmt"]
    # one layer mapping for all layer-wise terms: CKD's presets through relations.match_layers
    skip = build_stages(make_config("joint", pkt=dict(matching="last")), teacher_cfg, student_cfg)[1]
    assert skip.losses["fmt"]["layers"] == [[3, 1]] and skip.projections == (2,)
    with pytest.raises(ValueError, match=r"pkt.relation_heads=3 must divide both attention widths \(teacher 64, "
                                         r"student 16\)"):
        build_stages(make_config("joint", pkt=dict(relation_heads=3)), teacher_cfg, student_cfg)


@pytest.mark.slow
def test_joint_stage_across_widths_trains_student_and_projections():
    """Random teacher, synthetic padded batches: the jkt stage's loss falls, layers and projections move, embeddings
    (SVD-initialised from the teacher) and heads stay frozen."""
    from test_engine import FAST_COMPILE, flat, make_config, same_bits, synthetic_batch

    teacher_cfg, student_cfg = _cross_models()
    stage = build_stages(make_config("joint", pkt=dict(steps_per_layer=15, warmup_steps=0)), teacher_cfg,
                         student_cfg)[1]
    t_graphdef, t_params = nnx.split(PreTrainingModel(teacher_cfg, nnx.Rngs(0)), nnx.Param)
    s_graphdef, s_params = nnx.split(PreTrainingModel(student_cfg, nnx.Rngs(1)), nnx.Param)
    s_params, report = init_from_teacher(s_params, t_params, student_cfg, teacher_cfg)
    assert report["embeddings"] == "truncated SVD 16 -> 16" and report["feature_map"] == "32 -> 24"
    params = projection.attach(s_params, projection.init_projections(stage.projections, 24, 32, 0))
    tx, step = steps.make_train_step(stage, s_graphdef, params, t_graphdef)
    opt_state = tx.init(params)
    batches = [synthetic_batch(i, student_cfg.vocab_size) for i in range(2)]
    compiled = jax.jit(step).lower(params, opt_state, t_params, batches[0], jax.random.key(0)).compile(FAST_COMPILE)
    start, history = params, []
    for i in range(stage.steps):
        params, opt_state, m = compiled(params, opt_state, t_params, batches[i % 2], jax.random.key(i))
        history.append({k: float(v) for k, v in m.items()})
    assert set(history[0]) == {"fmt", "attn_relation", "beta", "gamma", "loss", "grad_norm"}
    assert all(np.isfinite(v) for m in history for v in m.values())
    first, last = np.mean([m["loss"] for m in history[:2]]), np.mean([m["loss"] for m in history[-2:]])
    assert last < 0.9 * first, (first, last)
    first, last = np.mean([m["fmt"] for m in history[:2]]), np.mean([m["fmt"] for m in history[-2:]])
    assert last < 0.9 * first, (first, last)
    before, after = flat(start), flat(params)
    for path in before:
        moved = not same_bits(before[path], after[path])
        if path.startswith(("projections/", "encoder/layers/")):
            if path.endswith("kernel"):
                assert moved, path
        else:
            assert not moved, path
    assert projection.drop(params).keys() == s_params.keys()


@pytest.fixture(scope="module")
def stage_run(tmp_path_factory):
    """A 1-step teacher stage, then a jkt stage with projections through `train.run_stage` in a workdir."""
    from _data_helpers import corpus

    from mobiledistill import sharding, train
    from mobiledistill.config import pretraining_config
    from mobiledistill.data import InMemoryCorpus, train_wordpiece

    docs = [d for d in corpus().documents if len(d) > 400][:60]
    tok = train_wordpiece(docs, vocab_size=300)
    teacher_cfg, student_cfg = _cross_models()
    teacher_cfg, student_cfg = (teacher_cfg.replace(vocab_size=tok.vocab_size),
                                student_cfg.replace(vocab_size=tok.vocab_size))
    c = pretraining_config()
    c.strategy = "joint"
    c.data.max_seq_length, c.data.max_predictions_per_seq = 32, 5
    c.train.update(global_batch=8, checkpoint_every=3, log_every=3, keep_checkpoints=3, eval_batches=1)
    c.teacher.update(steps=1, warmup_steps=0)
    c.pkt.update(steps_per_layer=3, warmup_steps=0, lr=5e-3)
    stages = build_stages(c, teacher_cfg, student_cfg)
    workdir = tmp_path_factory.mktemp("cross_width")

    def run(name):
        ctx = train.RunContext(epath.Path(workdir), c, sharding.make_mesh(), teacher_cfg, student_cfg, tok,
                               InMemoryCorpus("train", docs[10:]), InMemoryCorpus("heldout", docs[:10]), 1e9,
                               train.SigtermFlag())
        stage = next(s for s in stages if s.name == name)
        return train.run_stage(ctx, stage, 0, len(stages))

    run("teacher")
    summary = run("jkt")
    return dict(workdir=workdir, run=run, stages=stages, summary=summary, student_cfg=student_cfg)


def _raw_params(stage_dir, step):
    manager = ocp.CheckpointManager(stage_dir / "checkpoints", item_names=("params", "opt_state", "data"))
    try:
        tree = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore())).params
    finally:
        manager.close()
    return {jax.tree_util.keystr(p).removesuffix("['value']"): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow
def test_projections_are_checkpointed_resumed_and_not_handed_on(stage_run, capsys):
    from mobiledistill import checkpoint as ckpt
    from mobiledistill import train

    jkt_dir = stage_run["workdir"] / "jkt"
    assert stage_run["summary"]["final_step"] == 6
    assert stage_run["summary"]["init_from_teacher"]["feature_map"] == "32 -> 24"
    mid, final = _raw_params(jkt_dir, 3), _raw_params(jkt_dir, 6)
    proj = sorted(k for k in mid if k.startswith("['projections']"))
    assert proj == [f"['projections']['{i}']['{n}']" for i in (1, 2) for n in ("bias", "kernel")]
    assert mid["['projections']['1']['kernel']"].shape == (24, 32)
    assert not any(k.startswith("['projections']") for k in final)  # the hand-off is the student alone
    # the next stage (and fine-tuning's init=stage:) reads the final checkpoint with the plain student tree
    _, abstract = train.abstract_model(stage_run["student_cfg"])
    handed = ckpt.restore_final_params(jkt_dir, abstract)
    assert "projections" not in handed and set(handed) == {"encoder", "mlm", "nsp"}
    # interrupted after step 3: the rerun restores the step-3 projections and ends bit-identical
    import shutil

    shutil.rmtree(jkt_dir / "checkpoints" / "6")
    (jkt_dir / "done.json").unlink()
    stage_run["run"]("jkt")
    again = _raw_params(jkt_dir, 6)
    assert again.keys() == final.keys()
    for k in final:
        assert np.array_equal(again[k], final[k]), k
    assert "resuming at step 3: 6 steps" in capsys.readouterr().out
