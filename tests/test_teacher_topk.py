"""Offline teacher for PD (`mobiledistill.teacher_topk`): the top-k loss, the stored batches, resume, and a pipeline
whose PD stage never runs the teacher."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from _benchmarks import load_benchmark
from flax import nnx
from test_pipeline import final_params, tiny, vocab  # noqa: F401  (vocab: the module's fixture)

from mobiledistill import losses, sharding
from mobiledistill import teacher_topk as topk
from mobiledistill.data import InMemoryCorpus, PretrainingConfig, PretrainingIterator, embedded_corpus, train_wordpiece
from mobiledistill.models import PreTrainingModel, preset
from mobiledistill.optim import OptimizerConfig
from mobiledistill.strategies import Stage


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _naive_pd_loss(student, labels, weights, t_values, t_ids, alpha, temperature):
    """alpha * CE(label) + (1 - alpha) * CE(softmax over the teacher's stored logits only), weighted mean + 1e-5."""
    log_s = _log_softmax(student.astype(np.float64))
    p = np.exp(_log_softmax(t_values.astype(np.float64) / temperature))
    per = np.zeros(labels.shape)
    for b, q in np.ndindex(labels.shape):
        per[b, q] = -alpha * log_s[b, q, labels[b, q]] - (1 - alpha) * sum(
            p[b, q, j] * log_s[b, q, t_ids[b, q, j]] for j in range(t_ids.shape[-1]))
    return (weights * per).sum() / (weights.sum() + 1e-5)


def test_topk_loss_is_the_full_loss_when_k_is_the_vocab_and_the_naive_formula_below():
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(2, 3, 40)) * 3, rng.normal(size=(2, 3, 40)) * 3
    labels, weights = rng.integers(0, 40, (2, 3)), np.array([[1, 1, 0], [1, 0, 1]], np.float32)
    full = losses.mlm_distill_loss(student, labels, weights, teacher, alpha=0.3, temperature=2.0)
    ids = np.argsort(-teacher, -1)  # every id, in top-k order
    every = losses.mlm_distill_loss(student, labels, weights, np.take_along_axis(teacher, ids, -1), alpha=0.3,
                                    temperature=2.0, teacher_indices=ids)
    np.testing.assert_allclose(every, full, rtol=1e-6)
    values, top = jax.lax.top_k(teacher, 5)
    got = losses.mlm_distill_loss(student, labels, weights, values, alpha=0.3, temperature=2.0,
                                  teacher_indices=top)
    want = _naive_pd_loss(student, labels, weights, np.asarray(values), np.asarray(top), 0.3, 2.0)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert abs(float(got) - float(full)) > 1e-3  # truncating the teacher changes the target


def test_registry_term_reads_the_stored_topk_from_the_batch():
    rng = np.random.default_rng(1)
    s_logits, t_logits = rng.normal(size=(2, 3, 30)), rng.normal(size=(2, 3, 30))
    batch = dict(masked_lm_ids=rng.integers(0, 30, (2, 3)), masked_lm_weights=np.ones((2, 3), np.float32))
    values, ids = jax.lax.top_k(t_logits, 30)
    online = losses.build_loss({"mlm_distill": {"alpha": 0.5}})
    offline = losses.build_loss(topk.offline_stage(_stage(30)).losses)
    on, _ = online({"mlm_logits": t_logits}, {"mlm_logits": s_logits}, batch)
    off, terms = offline(None, {"mlm_logits": s_logits},
                         dict(batch, teacher_mlm_topk_values=values, teacher_mlm_topk_indices=ids))
    np.testing.assert_allclose(off, on, rtol=1e-6)
    assert set(terms) == {"mlm_distill"}


def _stage(k, epochs=1.0, losses_=None):
    return Stage("pd", 4, losses_ or {"mlm_distill": {"alpha": 0.5}}, OptimizerConfig(), init="fresh", teacher_from="teacher",
                 teacher_top_k=k, teacher_topk_epochs=epochs)


def test_stage_refuses_an_offline_teacher_for_terms_that_need_more_than_logits():
    with pytest.raises(ValueError, match="read only its MLM logits"):
        _stage(8, losses_={"mlm_distill": {}, "fmt": {"layers": [1]}})
    with pytest.raises(ValueError, match="epochs > 0"):
        _stage(8, epochs=0)


@pytest.fixture(scope="module")
def setup():
    docs = [d for d in embedded_corpus().texts(max_chars=60_000)][:24]
    tok = train_wordpiece(docs, vocab_size=300)
    cfg = preset("test_ib_bert", vocab_size=tok.vocab_size)
    graphdef, params = nnx.split(PreTrainingModel(cfg, nnx.Rngs(0)), nnx.Param)
    return InMemoryCorpus("docs", docs), tok, (graphdef, params), sharding.make_mesh()


def _iterator(setup, seed=5):
    corpus, tok, _, mesh = setup
    return PretrainingIterator(corpus, tok, global_batch_size=4, seed=seed, sharding=None,
                               config=PretrainingConfig(max_seq_length=32, max_predictions_per_seq=5))


def _files(directory):
    """{file: {array name: bytes}} of the stored batches (zip timestamps aside)."""
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".npz"):
            with np.load(os.path.join(directory, name), allow_pickle=False) as z:
                out[name] = {k: z[k].tobytes() for k in z.files}
    return out


def test_stored_batches_are_the_stream_with_the_teachers_topk_and_a_killed_build_resumes(setup, tmp_path):
    corpus, tok, teacher, mesh = setup
    stage = _stage(7, epochs=0.5)
    reader = topk.prepare(tmp_path, stage, teacher, _iterator(setup), mesh, "[pd]")
    meta = json.loads((tmp_path / "teacher_topk" / "meta.json").read_text())
    assert meta["batches"] == reader.count >= 2 and 0.5 <= meta["epochs_read"] < 1.0
    assert 0.0 < meta["top_k_mass"] < 1.0 and meta["signature"]["top_k"] == 7
    # Each stored batch is the stage's own stream, and its top k is the teacher's on that batch.
    stream, fn = _iterator(setup), jax.jit(topk.make_topk_fn(stage, teacher[0], 7))
    reader_np = topk.TopKBatches(tmp_path / "teacher_topk", reader.count)
    for _ in range(reader.count):
        want, got = stream.next_numpy(), reader_np.next_numpy()
        values, ids, _, _ = fn(teacher[1], want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
        np.testing.assert_array_equal(got["teacher_mlm_topk_indices"], ids)
        np.testing.assert_allclose(got["teacher_mlm_topk_values"], values, rtol=1e-6)
    # After the last stored batch the reader starts over; its state resumes it exactly.
    first = topk.TopKBatches(tmp_path / "teacher_topk", reader.count).next_numpy()
    np.testing.assert_array_equal(reader_np.next_numpy()["input_ids"], first["input_ids"])
    again = topk.TopKBatches(tmp_path / "teacher_topk", reader.count)
    again.set_state(reader_np.get_state())
    np.testing.assert_array_equal(again.next_numpy()["input_ids"], reader_np.next_numpy()["input_ids"])

    # A build killed after two batches (the meta never written, the third file cut short) ends with the same files.
    whole = _files(tmp_path / "teacher_topk")
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "teacher_topk", killed / "teacher_topk")
    os.remove(killed / "teacher_topk" / "meta.json")
    names = sorted(whole)
    for name in names[3:]:
        os.remove(killed / "teacher_topk" / name)
    with open(killed / "teacher_topk" / names[2], "r+b") as f:
        f.truncate(100)
    topk.prepare(killed, stage, teacher, _iterator(setup), mesh, "[pd]")
    assert _files(killed / "teacher_topk") == whole


def test_a_finished_cache_built_for_other_settings_is_refused_and_kept(setup, tmp_path):
    _, _, teacher, mesh = setup
    topk.prepare(tmp_path, _stage(4, epochs=0.2), teacher, _iterator(setup), mesh)
    before = _files(tmp_path / "teacher_topk")
    with pytest.raises(topk.CacheMismatch, match="top_k differ"):
        topk.prepare(tmp_path, _stage(5, epochs=0.2), teacher, _iterator(setup), mesh)
    with pytest.raises(topk.CacheMismatch, match="seed differ"):
        topk.prepare(tmp_path, _stage(4, epochs=0.2), teacher, _iterator(setup, seed=6), mesh)
    assert _files(tmp_path / "teacher_topk") == before
    with pytest.raises(Exception, match="offline-teacher batches"):
        topk.TopKBatches(tmp_path / "teacher_topk", 3).set_state({"kind": "pretraining", "doc_step": 3})


@pytest.mark.slow
def test_pipeline_pd_with_an_offline_teacher_of_every_logit_trains_as_the_online_one(vocab, tmp_path):
    """benchmarks/offline_teacher.py on the tiny recipe: its online pipeline, then the PD stage again from the same
    transfer stages with the offline teacher at k = the vocabulary (enough stored batches for every step): the same
    student to float rounding (the top-k order sums the soft target differently), the same logged losses and the
    full teacher mass; and k = 4 keeps less of it."""
    bench = load_benchmark("offline_teacher")
    vocab_size = len(open(vocab).read().split())
    overrides = [a[len("--config."):] for a in tiny(vocab) if a.startswith("--config.")]
    out = bench.main([f"--config={tiny(vocab)[0].split('=', 1)[1]}", f"--top_k={vocab_size},4", "--epochs=0.05",
                      f"--work={tmp_path}", f"--out={tmp_path / 'result.json'}",
                      *(f"--set={o}" for o in overrides)])
    assert json.loads((tmp_path / "result.json").read_text()) == json.loads(json.dumps(out))
    full, four = out["offline"][f"k={vocab_size}"], out["offline"]["k=4"]
    assert full["cache_batches"] >= 8 and full["top_k_mass"] == pytest.approx(1.0, abs=1e-5)
    assert 0.0 < four["top_k_mass"] < 0.99 and four["cache_batches"] == full["cache_batches"]
    assert full["train_loss_minus_online"]["max_abs"] < 1e-3 * abs(out["online"]["losses"][8])
    want, got = final_params(tmp_path / "online", "pd", 8), final_params(tmp_path / f"offline_k{vocab_size}", "pd", 8)
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=2e-4, atol=2e-5, err_msg=key)
    for r in (out["online"], full, four):
        assert 0.0 <= r["eval_mlm_accuracy"] <= 1.0

