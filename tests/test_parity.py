"""Numerical parity of our encoder family with `transformers` (PyTorch, CPU, fp32) and exact conversion round trips."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from mobiledistill import convert  # noqa: E402
from mobiledistill.models import Encoder, PreTrainingModel, preset  # noqa: E402

TOL = 1e-4


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref| over the compared entries."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


def hf_pretraining_model(cfg):
    hf_cfg = convert.config_to_hf(cfg)
    cls = {"bert": transformers.BertConfig, "mobilebert": transformers.MobileBertConfig}[hf_cfg.pop("model_type")]
    hf_cfg.pop("architectures")
    config = cls(**hf_cfg, attn_implementation="eager")
    model_cls = transformers.BertForPreTraining if cls is transformers.BertConfig else \
        transformers.MobileBertForPreTraining
    torch.manual_seed(0)
    model = model_cls(config).eval()
    # Random, non-trivial norm parameters so that NoNorm/LayerNorm scale and bias are really checked.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def make_batch(cfg, batch, seq, padded, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, cfg.vocab_size, (batch, seq))
    types = (np.arange(seq)[None, :] >= seq // 2).astype(np.int64).repeat(batch, 0)
    mask = np.ones((batch, seq), np.int64)
    if padded:
        for b in range(batch):
            n = seq - 1 - (3 * b) % (seq // 2)
            mask[b, n:] = 0
            ids[b, n:] = cfg.pad_token_id
            types[b, n:] = 0
    return ids, types, mask


def compare_pretraining(cfg, batch=3, seq=16, padded=False):
    hf = hf_pretraining_model(cfg)
    ours = PreTrainingModel(cfg, nnx.Rngs(1))
    convert.load_hf_state_dict(ours, {k: v.detach().numpy() for k, v in hf.state_dict().items()})
    ids, types, mask = make_batch(cfg, batch, seq, padded)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types),
                 attention_mask=torch.tensor(mask), output_hidden_states=True, output_attentions=True)
    mlm, nsp, out = ours(jnp.asarray(ids), jnp.asarray(types), jnp.asarray(mask))
    valid = mask.astype(bool)
    errs = {"sequence": rel_err(np.asarray(out.sequence_output)[valid], ref.hidden_states[-1].numpy()[valid]),
            "mlm": rel_err(np.asarray(mlm)[valid], ref.prediction_logits.numpy()[valid]),
            "nsp": rel_err(nsp, ref.seq_relationship_logits.numpy())}
    assert len(out.hidden_states) == len(ref.hidden_states) == cfg.num_hidden_layers + 1
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        errs[f"hidden_{i}"] = rel_err(np.asarray(a)[valid], b.numpy()[valid])
    for i, (a, b) in enumerate(zip(out.attention_probs, ref.attentions)):
        # query rows of real tokens; masked key columns are ~0 in both
        errs[f"attn_{i}"] = rel_err(np.asarray(a).transpose(0, 2, 1, 3)[valid], b.numpy().transpose(0, 2, 1, 3)[valid])
    worst = max(errs, key=errs.get)
    assert errs[worst] <= TOL, f"{worst}: {errs[worst]:.3g} ({errs})"
    return ours, hf


SMALL = ["test_mobilebert", "test_mobilebert_tiny", "test_mobilebert_no_opt", "test_bert"]


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("name", SMALL)
def test_parity_small(name, padded):
    compare_pretraining(preset(name), padded=padded)


def test_parity_full_size_mobilebert():
    compare_pretraining(preset("mobilebert"), batch=2, seq=24, padded=True)


def test_ib_bert_path_equals_mobilebert_where_they_coincide():
    """IB-BERT (bottleneck, Q/K/V from the block input) with intra == hidden is buildable by transformers.

    The preset itself has no eps quirk (the official TF teachers use layer_norm_eps everywhere); transformers'
    MobileBERT has it, so the comparison turns it on."""
    assert not preset("ib_bert_large").hf_eps_quirk
    cfg = preset("test_ib_bert", intra_bottleneck_size=32, hf_eps_quirk=True)
    compare_pretraining(cfg, padded=True)


@pytest.mark.parametrize("name", SMALL + ["test_ib_bert"])
def test_round_trip_flax_hf_flax_is_exact(name):
    cfg = preset(name)
    a = PreTrainingModel(cfg, nnx.Rngs(3))
    sd = convert.to_hf_state_dict(a)
    b = PreTrainingModel(cfg, nnx.Rngs(4))
    convert.load_hf_state_dict(b, sd)
    fa = dict(nnx.to_flat_state(nnx.state(a, nnx.Param)))
    fb = dict(nnx.to_flat_state(nnx.state(b, nnx.Param)))
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k].get_value()), np.asarray(fb[k].get_value()), err_msg=str(k))


@pytest.mark.parametrize("name", ["test_mobilebert", "test_bert"])
def test_saved_directory_loads_in_transformers(tmp_path, name):
    """save_hf writes a directory that transformers' from_pretrained loads with identical outputs (and back)."""
    cfg = preset(name)
    ours = PreTrainingModel(cfg, nnx.Rngs(5))
    convert.save_hf(ours, str(tmp_path))
    hf_cls = transformers.BertForPreTraining if name == "test_bert" else transformers.MobileBertForPreTraining
    hf = hf_cls.from_pretrained(str(tmp_path)).eval()
    ids, types, mask = make_batch(cfg, 2, 12, padded=True)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types), attention_mask=torch.tensor(mask))
    mlm, nsp, _ = ours(jnp.asarray(ids), jnp.asarray(types), jnp.asarray(mask))
    valid = mask.astype(bool)
    assert rel_err(np.asarray(mlm)[valid], ref.prediction_logits.numpy()[valid]) <= TOL
    assert rel_err(nsp, ref.seq_relationship_logits.numpy()) <= TOL
    back = convert.load_hf(str(tmp_path))
    mlm2, _, _ = back(jnp.asarray(ids), jnp.asarray(types), jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(mlm2), np.asarray(mlm))


def test_bare_encoder_hf_mobilebert_model_parity():
    cfg = preset("test_mobilebert")
    hf_cfg = convert.config_to_hf(cfg)
    hf_cfg.pop("model_type"), hf_cfg.pop("architectures")
    torch.manual_seed(1)
    hf = transformers.MobileBertModel(transformers.MobileBertConfig(**hf_cfg)).eval()
    enc = Encoder(cfg, nnx.Rngs(0))
    convert.load_hf_state_dict(enc, {k: v.numpy() for k, v in hf.state_dict().items()})
    ids, types, mask = make_batch(cfg, 2, 10, padded=True)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types), attention_mask=torch.tensor(mask))
    out = enc(jnp.asarray(ids), jnp.asarray(types), jnp.asarray(mask))
    valid = mask.astype(bool)
    assert rel_err(np.asarray(out.sequence_output)[valid], ref.last_hidden_state.numpy()[valid]) <= TOL
    back = convert.to_hf_state_dict(enc)
    for k, v in hf.state_dict().items():
        if k in back:
            np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)


def test_conversion_errors_name_the_tensors():
    cfg = preset("test_mobilebert")
    model = PreTrainingModel(cfg, nnx.Rngs(0))
    sd = convert.to_hf_state_dict(model)
    broken = dict(sd)
    del broken["mobilebert.encoder.layer.1.attention.self.query.weight"]
    broken["mobilebert.encoder.layer.0.intermediate.dense.weight"] = np.zeros((3, 3), np.float32)
    broken["mobilebert.encoder.layer.9.something.weight"] = np.zeros(2, np.float32)
    with pytest.raises(convert.ConversionError) as e:
        convert.load_hf_state_dict(model, broken)
    msg = str(e.value)
    assert "\n" not in msg
    assert "missing ['mobilebert.encoder.layer.1.attention.self.query.weight']" in msg
    assert "mobilebert.encoder.layer.0.intermediate.dense.weight (3, 3)" in msg
    assert "unexpected ['mobilebert.encoder.layer.9.something.weight']" in msg


def test_corrupt_or_missing_checkpoint_files(tmp_path):
    with pytest.raises(convert.ConversionError, match="no config.json"):
        convert.load_hf(str(tmp_path))
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(convert.ConversionError, match="cannot read safetensors"):
        convert.read_safetensors(str(bad))
    with pytest.raises(convert.ConversionError, match="model_type='gpt2'"):
        convert.config_from_hf({"model_type": "gpt2"})
