"""classifier_pooling='mean': the masked mean of the last layer as the classifier's input (sentence-transformers'
read-out), checked against NumPy, invariant to padding, recorded in model.json, refused by the HF export."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from mobiledistill import convert, finetune
from mobiledistill.models import SequenceClassificationModel, preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))

import finetune_glue  # noqa: E402


def _model(pooling, name="test_bert"):
    return SequenceClassificationModel(preset(name, classifier_pooling=pooling), 3, nnx.Rngs(0))


@pytest.mark.parametrize("name", ["test_bert", "test_mobilebert"])
def test_mean_pooling_matches_numpy_and_ignores_padding(name):
    model = _model("mean", name)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, model.encoder.cfg.vocab_size, size=(3, 12))
    lengths = np.array([12, 7, 3])
    mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask, ids, 0)
    logits, out = model(jnp.asarray(ids), jnp.zeros_like(ids), jnp.asarray(mask))
    seq = np.asarray(out.sequence_output, np.float64)
    want = np.stack([seq[b, :n].mean(0) for b, n in enumerate(lengths)])
    np.testing.assert_allclose(np.asarray(out.pooled_output), want, rtol=1e-5, atol=1e-6)
    w, b = (np.asarray(model.classifier.kernel[...]), np.asarray(model.classifier.bias[...]))
    np.testing.assert_allclose(np.asarray(logits), want @ w + b, rtol=1e-4, atol=1e-5)
    # More padding on the right changes nothing for rows already padded (a full row's last token would see a [PAD]
    # instead of the zero beyond the sequence through MobileBERT's trigram embedding, as in transformers); the
    # [CLS] read-out of the same weights differs.
    pad = np.zeros((3, 4), ids.dtype)
    longer, _ = model(jnp.asarray(np.concatenate([ids, pad], 1)), jnp.zeros((3, 16), jnp.int32),
                      jnp.asarray(np.concatenate([mask, pad], 1)))
    np.testing.assert_allclose(np.asarray(longer)[1:], np.asarray(logits)[1:], rtol=1e-5, atol=1e-5)
    cls_model = _model("cls", name)
    nnx.update(cls_model, nnx.state(model, nnx.Param))
    cls_logits, _ = cls_model(jnp.asarray(ids), jnp.zeros_like(ids), jnp.asarray(mask))
    assert not np.allclose(np.asarray(cls_logits), np.asarray(logits), atol=1e-4)


def test_bad_pooling_is_one_line_error():
    with pytest.raises(ValueError, match=r"classifier_pooling='max'; valid: cls, mean"):
        preset("test_bert", classifier_pooling="max")


def test_hf_export_refuses_mean_pooled_classifier_but_saves_the_encoder(tmp_path):
    model = _model("mean")
    with pytest.raises(convert.ConversionError, match="classifier_pooling='mean'"):
        convert.save_hf(model, str(tmp_path / "task"))
    assert not (tmp_path / "task").exists()
    convert.save_hf(model.encoder, str(tmp_path / "encoder"))
    assert (tmp_path / "encoder" / "model.safetensors").exists()


@pytest.mark.slow
def test_finetune_records_mean_pooling_and_its_teacher_keeps_it(tmp_path):
    c = finetune_glue.get_config("task=sst2,tiny=1")
    c.model.classifier_pooling = "mean"
    c.seeds = (0,)
    with tfds.testing.mock_data(num_examples=10):
        out = finetune.run(c, str(tmp_path / "run"))
    assert np.isfinite(out[0]["accuracy"])
    info = json.load(open(tmp_path / "run" / "model.json"))
    assert info["encoder"]["classifier_pooling"] == "mean"
    teacher = finetune.load_finetuned(tmp_path / "run")
    assert teacher.cfg.classifier_pooling == "mean"
    jax.clear_caches()
