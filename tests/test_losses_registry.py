"""Loss registry: named terms built from config, weighted sum, extension with new terms."""

import types

import jax.numpy as jnp
import numpy as np
import pytest

from mobiledistill import losses as L

B, S, H, V = 2, 4, 8, 7
MASK = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.int32)


def _out(seed):
    rng = np.random.default_rng(seed)
    return types.SimpleNamespace(
        hidden_states=tuple(rng.normal(size=(B, S, H)).astype(np.float32) for _ in range(3)),
        attention_scores=tuple(rng.normal(size=(B, 2, S, S)).astype(np.float32) for _ in range(2)),
        mlm_logits=rng.normal(size=(B, 3, V)).astype(np.float32),
        nsp_logits=rng.normal(size=(B, 2)).astype(np.float32),
        logits=rng.normal(size=(B, 3)).astype(np.float32),
    )


BATCH = {
    "attention_mask": MASK,
    "masked_lm_ids": np.array([[1, 2, 3], [4, 5, 0]], np.int32),
    "masked_lm_weights": np.array([[1, 1, 1], [1, 1, 0]], np.float32),
    "next_sentence_labels": np.array([[0], [1]], np.int32),
    "labels": np.array([2, 0]),
}


def test_build_loss_matches_direct_calls():
    t, s = _out(0), _out(1)
    spec = {
        "fmt": {"weight": 100.0, "layers": [1]},
        "at": {"weight": 1.0, "layers": [1]},
        "beta": {"weight": 5000.0, "layers": [1]},
        "gamma": {"weight": 5.0, "layers": [1]},
        "mlm_distill": {"weight": 1.0, "alpha": 0.5},
        "nsp": {"weight": 1.0},
        "kd_hot": {"loss": "logit_kd", "weight": 2.0, "temperature": 3.0},
        "unused": {"loss": "task_ce", "weight": 0.0},
    }
    total, terms = L.build_loss(spec)(t, s, BATCH)
    assert set(terms) == {"fmt", "at", "beta", "gamma", "mlm_distill", "nsp", "kd_hot"}
    lt_total, lt_terms = L.layer_transfer_loss(t, s, [1], None, MASK)
    for k in ("fmt", "at", "beta", "gamma"):
        np.testing.assert_allclose(terms[k], lt_terms[k], rtol=1e-6)
    mlm = L.mlm_distill_loss(s.mlm_logits, BATCH["masked_lm_ids"], BATCH["masked_lm_weights"], t.mlm_logits, alpha=0.5)
    nsp = L.nsp_loss(s.nsp_logits, BATCH["next_sentence_labels"])
    kd = L.logit_kd_loss(s.logits, t.logits, 3.0)
    np.testing.assert_allclose(terms["mlm_distill"], mlm, rtol=1e-6)
    np.testing.assert_allclose(total, lt_total + mlm + nsp + 2 * kd, rtol=1e-5)


def test_pkd_through_registry():
    t, s = _out(2), _out(3)
    spec = {
        "task_ce": {"weight": 0.3},
        "kl_kd": {"weight": 0.7, "temperature": 10.0, "reduction": "elementwise_mean"},
        "patience": {"weight": 100.0, "student_layers": [1], "teacher_layers": [2]},
    }
    total, _ = L.build_loss(spec)(t, s, BATCH)
    want, _ = L.patient_kd_loss(
        s.logits, t.logits, BATCH["labels"], [s.hidden_states[1][:, 0]], [t.hidden_states[2][:, 0]]
    )
    np.testing.assert_allclose(total, want, rtol=1e-5)


def test_teacher_free_terms_accept_none_teacher_and_dicts():
    s = vars(_out(4))
    total, terms = L.build_loss({"mlm": {}, "nsp": {}})(None, s, BATCH)
    np.testing.assert_allclose(total, terms["mlm"] + terms["nsp"], rtol=1e-6)


def test_new_terms_register_without_changes():
    name = "test_mean_hidden_gap"

    @L.register_loss(name)
    def _factory(layer: int = 0):
        return lambda t, s, b: jnp.mean(jnp.abs(s.hidden_states[layer] - t.hidden_states[layer]))

    try:
        t, s = _out(5), _out(6)
        total, terms = L.build_loss({name: {"weight": 2.0, "layer": 2}})(t, s, BATCH)
        np.testing.assert_allclose(total, 2 * np.abs(s.hidden_states[2] - t.hidden_states[2]).mean(), rtol=1e-6)
        with pytest.raises(ValueError, match="already registered"):
            L.register_loss(name)(_factory)
    finally:
        L.LOSS_REGISTRY.pop(name, None)


def test_unknown_loss_and_bad_params_are_clear_errors():
    with pytest.raises(ValueError, match="unknown loss 'fmtt'"):
        L.build_loss({"fmtt": {"layers": [0]}})
    with pytest.raises(ValueError, match="loss 'nsp': bad parameters"):
        L.build_loss({"nsp": {"temperature": 2.0}})
