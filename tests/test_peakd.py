"""Pea-KD: SPS plans on BERT / MobileBERT students, PTP labels against the official thresholds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mobiledistill.models import Encoder, encoder_param_count, preset
from mobiledistill.strategies.peakd import PTP_THRESHOLDS, paired_plan, ptp_labels, ptp_thresholds, top_layers_plan


def _logits_with_conf(conf, pred, num_classes):
    """Logits whose softmax puts `conf` on class `pred` and spreads the rest evenly."""
    rest = (1.0 - conf) / (num_classes - 1)
    p = np.full(num_classes, rest)
    p[pred] = conf
    return np.log(p)


@pytest.mark.parametrize("task", sorted(PTP_THRESHOLDS))
@pytest.mark.parametrize("num_classes", [2, 3])
def test_ptp_labels_follow_the_official_table(task, num_classes):
    t1, t2 = ptp_thresholds(task)
    lo = 1.0 / num_classes + 0.01  # a confidence still above chance
    rows = [  # (conf, predicted class, gold label, expected PTP label)
        (min(t1 + 0.01, 0.999), 1, 1, 0), (t1 - 0.01, 1, 1, 1), (max(lo, 0.5 * t1), 0, 0, 1),
        (min(t2 + 0.01, 0.999), 0, 1, 2), (t2 - 0.01, 0, 1, 3), (lo, 1, 0, 3),
    ]
    logits = np.stack([_logits_with_conf(c, p, num_classes) for c, p, _, _ in rows])
    labels = np.array([g for _, _, g, _ in rows])
    out = ptp_labels(logits, labels, t1, t2)
    assert out.dtype == np.int32 and out.tolist() == [e for *_, e in rows]


def test_ptp_thresholds_any_case_and_bad_input():
    assert ptp_thresholds("SST-2") == ptp_thresholds("sst2") == (0.98, 0.8)
    assert ptp_thresholds("QNLI") == (0.98, 0.7) and ptp_thresholds("RTE") == (0.8, 0.6)
    assert ptp_thresholds("MRPC") == (0.95, 0.75)
    with pytest.raises(ValueError, match="no PTP thresholds for task 'cola'"):
        ptp_thresholds("cola")
    with pytest.raises(ValueError, match="need \\[N, C>=2\\] logits"):
        ptp_labels(np.zeros((3, 2)), np.zeros(2), 0.9, 0.6)


def test_plans():
    assert paired_plan(3) == ((0, False), (1, False), (2, False), (0, True), (1, True), (2, True))
    assert top_layers_plan(6) == tuple((i, False) for i in range(6)) + ((3, True), (4, True), (5, True))
    assert top_layers_plan(4, top=1)[-1] == (3, True) and len(top_layers_plan(4, top=1)) == 5
    with pytest.raises(ValueError, match="top=4 must lie in 1..num_layers=3"):
        top_layers_plan(3, top=4)
    with pytest.raises(ValueError, match="num_layers=0"):
        paired_plan(0)


@pytest.mark.parametrize("name", ["test_bert", "test_mobilebert"])
@pytest.mark.parametrize("plan_fn", [paired_plan, lambda n: top_layers_plan(n, top=1)])
def test_sps_student_shares_parameters(name, plan_fn):
    base = preset(name, num_hidden_layers=2)
    sps = base.replace(layer_plan=plan_fn(2))
    assert encoder_param_count(sps) == encoder_param_count(base)
    model = Encoder(sps, nnx.Rngs(0))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == encoder_param_count(base)
    out = model(jnp.ones((2, 5), jnp.int32))
    assert len(out.hidden_states) == len(sps.plan) + 1 and len(out.attention_scores) == len(sps.plan)


@pytest.mark.parametrize("name", ["test_bert", "test_mobilebert"])
def test_second_pass_uses_swapped_query_and_key(name):
    cfg = preset(name, num_hidden_layers=1, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    sps = Encoder(cfg.replace(layer_plan=paired_plan(1)), nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (2, 6), 1, cfg.vocab_size)
    out = sps(ids)
    # The same weights with Q and K exchanged, run unswapped on the first pass's output, equal the second pass.
    plain = Encoder(cfg, nnx.Rngs(0))
    layer = plain.layers[0]
    q_k, q_b = layer.query.kernel.get_value(), layer.query.bias.get_value()
    layer.query.kernel.set_value(layer.key.kernel.get_value())
    layer.query.bias.set_value(layer.key.bias.get_value())
    layer.key.kernel.set_value(q_k)
    layer.key.bias.set_value(q_b)
    mask = jnp.ones_like(ids)
    y, s, _ = layer(out.hidden_states[1], mask)
    np.testing.assert_allclose(out.hidden_states[2], y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.attention_scores[1], s, rtol=1e-5, atol=1e-5)
    # Swapping Q and K transposes the scores of the unswapped layer on the same input (before masking/softmax).
    _, s_plain, _ = sps.layers[0](out.hidden_states[1], mask)
    np.testing.assert_allclose(out.attention_scores[1], jnp.swapaxes(s_plain, -1, -2), rtol=1e-5, atol=1e-5)
    diff = np.abs(np.asarray(out.attention_scores[1]) - np.asarray(s_plain)).max()
    assert diff > 1e-2 * np.abs(np.asarray(s_plain)).max()  # the scores are not symmetric: the swap matters


def test_patience_layers():
    from mobiledistill.strategies.peakd import patience_layers
    assert patience_layers(6, 12) == ([1, 2, 3, 4, 5], [2, 4, 6, 8, 10])
    assert patience_layers(2, 2) == ([1], [1])
    with pytest.raises(ValueError, match="need 2 <= student layers"):
        patience_layers(1, 12)


@pytest.mark.slow
def test_peakd_end_to_end_tiny(tmp_path):
    import json
    import os
    import sys

    import tensorflow_datasets as tfds

    from mobiledistill import engine, finetune
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
    import finetune_glue
    import peakd as peakd_config

    teacher = str(tmp_path / "teacher")
    with tfds.testing.mock_data(num_examples=10):
        finetune.run(finetune_glue.get_config("task=sst2,tiny=1,seeds=1"), teacher)
        c = peakd_config.get_config(f"task=SST-2,teacher=finetune:{teacher},tiny=1")
        assert c.ptp.ptp.t1 == 0.98 and c.pkd.distill.extra_losses.kl_kd.temperature == 10.0
        out = engine.run(c, str(tmp_path / "peakd"))["pkd"]
    ptp_dir = tmp_path / "peakd" / "ptp"
    assert json.loads((ptp_dir / "model.json").read_text())["num_labels"] == 4
    assert (ptp_dir / "seed_0" / "best_encoder.npz").exists()
    m = json.loads((ptp_dir / "seed_0" / "validation_metrics.json").read_text())
    assert {"accuracy", "loss"} <= set(m)
    info = json.loads((tmp_path / "peakd" / "pkd" / "model.json").read_text())
    assert info["num_labels"] == 2 and info["encoder"]["layer_plan"] == [[0, False], [0, True]]
    assert sorted(out) == [0, 1] and all(np.isfinite(out[s]["accuracy"]) for s in out)
    last = json.loads((tmp_path / "peakd" / "pkd" / "seed_0" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"kl_kd", "patience", "task_ce"} <= set(last)
