"""Residual-stream equalisation (mobiledistill.quantize, issue #11 item 2): exact in float32, refused for LayerNorm,
and it makes dynamic int8 ONNX survive NoNorm outlier channels.

The int8 comparisons export tiny models with deliberate outlier channels (~1000x the median range) twice, with and
without equalisation, and print both errors; the export runtimes are required (never skipped).
"""

import json
import os

import numpy as np
import onnxruntime  # noqa: F401  (the export runtimes must be installed: fail loudly, never skip)
import pytest
from flax import nnx

from mobiledistill import export, export_stage, quantize
from mobiledistill.errors import ConfigError
from mobiledistill.export_source import Source
from mobiledistill.models import PreTrainingModel, SequenceClassificationModel, SpanModel, preset
from mobiledistill.strategies.peakd import paired_plan
from test_export import fake_finetune_run

VOCAB = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n" + "".join(f"w{i}\n" for i in range(92))  # 97 = the test presets'
OUTLIERS = [3, 11, 20]


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def perturb(model, seed=0):
    """Non-trivial norms and biases, so that every rescaled parameter matters."""
    rng = np.random.default_rng(seed)
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if "norm" in path or path[-1] == "bias":
            v.set_value(v.get_value() + 0.1 * rng.standard_normal(v.shape).astype(np.float32))
    return model


def build(name, kind, **overrides):
    cfg = preset(name, **overrides)
    model = {"cls": lambda: SequenceClassificationModel(cfg, 3, nnx.Rngs(0)),
             "span": lambda: SpanModel(cfg, nnx.Rngs(0)),
             "pretraining": lambda: PreTrainingModel(cfg, nnx.Rngs(0))}[kind]()
    return perturb(model)


def outlier_model(name, compensated: bool, kind="cls"):
    """A NoNorm model whose residual channels OUTLIERS are ~1000x the others. compensated: the same function as the
    perturbed random model, its readers' rows for those channels / 1024 (an inverse equalisation: outliers the model
    gives little weight); else the embedding NoNorm's scale and bias of those channels x 1000, nothing compensated
    (readers' rows of ordinary size: the outliers drive the outputs)."""
    model = build(name, kind)
    if compensated:
        s = np.ones(model.encoder.cfg.hidden_size, np.float32)
        s[OUTLIERS] = 1 / 1024
        return quantize.equalize_residual(model, s)
    norm = model.encoder.embeddings.norm
    f = np.ones(model.encoder.cfg.hidden_size, np.float32)
    f[OUTLIERS] = 1000.0
    norm.scale.set_value(norm.scale.get_value() * f)
    norm.bias.set_value(norm.bias.get_value() * f)
    return model


def padded_inputs(cfg, batch=3, seq_len=16):
    return export.random_inputs(cfg, batch, seq_len)  # rows after the first padded


# ---------------------------------------------------------------------------------------------------------------
# (a) exact in float32

EXACT_CASES = [
    ("test_mobilebert", "cls", {}),  # shared Q=K bottleneck, V from x, pooled = [CLS] vector
    ("test_mobilebert", "span", {}),
    ("test_mobilebert", "pretraining", {}),
    ("test_mobilebert_tiny", "cls", {"classifier_pooling": "mean"}),  # Q=K=V from the input bottleneck
    ("test_mobilebert_tiny", "span", {}),
    ("test_mobilebert_tiny", "pretraining", {}),
    ("test_ib_bert", "cls", {"normalization_type": "no_norm"}),  # Q, K, V from x; tanh pooler
    ("test_ib_bert", "pretraining", {"normalization_type": "no_norm"}),
    ("test_bert", "cls", {"normalization_type": "no_norm", "num_feedforward_networks": 2}),  # no bottleneck
    ("test_mobilebert", "cls", {"layer_plan": paired_plan(2)}),  # SPS: shared layers rescaled once
    ("test_mobilebert", "span", {"scan_layers": True}),
]


@pytest.mark.parametrize("name,kind,overrides", EXACT_CASES, ids=[f"{n}-{k}-{'-'.join(o) or 'plain'}"
                                                                   for n, k, o in EXACT_CASES])
def test_equalised_model_computes_the_same_outputs(name, kind, overrides):
    model = build(name, kind, **overrides)
    cfg = model.encoder.cfg
    ids, mask, types = padded_inputs(cfg)
    rng = np.random.default_rng(1)
    before = model(ids, types, mask)
    saved = {p: np.array(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for s in (np.exp2(rng.integers(0, 11, cfg.hidden_size)).astype(np.float32),  # powers of two, up to 1024
              rng.uniform(0.5, 300.0, cfg.hidden_size).astype(np.float32)):  # any positive scales
        after = quantize.equalize_residual(model, s)(ids, types, mask)
        for a, b in zip(after[:-1], before[:-1]):  # logits / start, end / MLM, NSP
            assert a.shape == b.shape and rel(a, b) <= 1e-5, (rel(a, b), a.shape)
        hb, ha = before[-1].hidden_states, after[-1].hidden_states
        assert len(ha) == len(hb) == len(cfg.plan) + 1
        for x, y in zip(ha, hb):
            np.testing.assert_allclose(np.asarray(x) * s, np.asarray(y), rtol=1e-5,
                                       atol=1e-5 * float(np.max(np.abs(y))))
    # The original model is untouched.
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        np.testing.assert_array_equal(np.asarray(v.get_value()), saved[p])
    again = model(ids, types, mask)
    np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(before[0]))


def test_power_of_two_scales_are_bit_exact():
    model = build("test_mobilebert", "pretraining")
    ids, mask, types = padded_inputs(model.encoder.cfg)
    s = np.exp2(np.arange(model.encoder.cfg.hidden_size) % 11).astype(np.float32)
    a, b = model(ids, types, mask), quantize.equalize_residual(model, s)(ids, types, mask)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))


@pytest.mark.slow
def test_calibration_finds_the_outlier_channels():
    for compensated in (True, False):
        model = outlier_model("test_mobilebert", compensated)
        cfg = model.encoder.cfg
        batches = quantize.calibration_inputs(cfg, 20, 16, batch=8, cls_id=2, sep_id=3)
        assert [len(b[0]) for b in batches] == [8, 8, 4]
        ids, mask, types = batches[0]
        assert (ids[:, 0] == 2).all() and all(ids[r, mask[r].sum() - 1] == 3 for r in range(8))
        assert (ids[mask == 0] == cfg.pad_token_id).all() and (mask == 0).any() and mask[0].all()
        ranges = quantize.residual_channel_ranges(model, batches)
        assert np.min(ranges[OUTLIERS]) > 100 * np.median(ranges)
        s = quantize.residual_channel_scales(model, batches)
        assert s.dtype == np.float32 and np.all(s >= 1) and np.all(np.log2(s) == np.round(np.log2(s)))
        # alpha = 0.5: outliers the readers weigh little are undone (~1024), others shrunk by ~sqrt(1000).
        assert np.all(s[OUTLIERS] >= (512 if compensated else 8)) and np.median(s) == 1.0, s
        after = quantize.residual_channel_ranges(quantize.equalize_residual(model, s), batches)
        np.testing.assert_allclose(after, ranges / s, rtol=1e-5)
        assert after.max() / np.median(after) < ranges.max() / np.median(ranges) / 10
    # alpha = 1 flattens the activation ranges whatever the weights; the compensated outliers are undone exactly.
    model = outlier_model("test_mobilebert", True)
    s1 = quantize.scales_from_ranges(quantize.residual_channel_ranges(model, batches), alpha=1.0)
    assert np.all(s1[OUTLIERS] >= 512)
    with pytest.raises(ValueError, match="alpha"):
        quantize.scales_from_ranges(np.ones(4), alpha=1.5)


# ---------------------------------------------------------------------------------------------------------------
# (b) refusals

def test_layer_norm_is_refused_in_one_line():
    for name in ("test_mobilebert_no_opt", "test_bert", "test_ib_bert"):
        model = build(name, "cls")
        with pytest.raises(quantize.EqualizeError, match="needs normalization_type='no_norm'") as e:
            quantize.equalize_residual(model, np.ones(model.encoder.cfg.hidden_size, np.float32))
        assert "\n" not in str(e.value) and "layer_norm" in str(e.value)
        with pytest.raises(quantize.EqualizeError):
            quantize.residual_channel_scales(model, quantize.calibration_inputs(model.encoder.cfg, 2, 8))
    model = build("test_mobilebert", "cls")
    for bad in (np.ones(5), np.zeros(32), np.full(32, np.inf)):
        with pytest.raises(quantize.EqualizeError, match="finite positive"):
            quantize.equalize_residual(model, bad)
    with pytest.raises(quantize.EqualizeError, match="heads' inputs are unknown"):
        quantize.equalize_residual(model.encoder.layers[0], np.ones(32))


def test_export_resolves_equalize():
    nonorm, ln = preset("test_mobilebert"), preset("test_bert")
    assert export.resolve_equalize(nonorm, "dynamic", None) is True  # the default where it applies
    assert export.resolve_equalize(nonorm, "dynamic", False) is False
    assert export.resolve_equalize(ln, "dynamic", None) is False  # silently not applicable
    assert export.resolve_equalize(nonorm, "none", None) is False
    with pytest.raises(export.ExportError, match="--equalize: residual equalisation needs"):
        export.resolve_equalize(ln, "dynamic", True)
    with pytest.raises(export.ExportError, match="add --quantize=dynamic"):
        export.resolve_equalize(nonorm, "none", True)


def test_export_stage_config():
    c = export_stage.export_config()
    assert c.equalize is True and c.calibration == export.CALIBRATION == 64
    export_stage.check(c)
    c.calibration = 0
    with pytest.raises(ConfigError, match="calibration=0"):
        export_stage.check(c)


# ---------------------------------------------------------------------------------------------------------------
# (c) int8 with and without equalisation

def _source(model, tmp_path) -> Source:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text(VOCAB)
    kind = {"SequenceClassificationModel": "classification", "SpanModel": "span",
            "PreTrainingModel": "pretraining"}[type(model).__name__]
    return Source(kind, model, str(vocab), None, "fixture", "outlier fixture")


def _errors(r, task_output):
    h = r["outputs"][export.HIDDEN]["per_channel"]
    return {"task_rel_err": r["outputs"][task_output]["rel_err"], "hidden_channel_max": h["max"],
            "hidden_channel_median": h["median"], "agreement": r["outputs"][task_output]["argmax_agreement"]}


INT8_CASES = [("test_mobilebert", True, "cls"), ("test_mobilebert", False, "cls"),
              ("test_mobilebert_tiny", True, "span"), ("test_mobilebert_tiny", False, "cls"),
              ("test_mobilebert", True, "pretraining")]


# the default suite keeps the first case; CI runs all of them with -m slow
@pytest.mark.parametrize("name,compensated,kind", [
    pytest.param(*c, marks=() if i == 0 else pytest.mark.slow,
                 id=f"{c[0]}-{'compensated' if c[1] else 'uncompensated'}-{c[2]}") for i, c in enumerate(INT8_CASES)])
def test_equalised_int8_keeps_the_ordinary_channels(tmp_path, name, compensated, kind):
    src = _source(outlier_model(name, compensated, kind), tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    record = export.export(src, str(out), ["onnx"], "dynamic", 24, True, repeats=1, calibration=32)
    eq = record["equalization"]
    assert eq["applied"] and eq["calibration_sequences"] == 32 and len(eq["scales"]) == 32
    s = np.asarray(eq["scales"])
    assert eq["scale_max"] == s.max() >= 16 and eq["range_ratio_before"] > 100 > eq["range_ratio_after"]
    task_output = export.OUTPUTS[src.kind][0]
    with_eq = _errors(record["verify"]["files"]["model.int8.onnx"], task_output)
    without = _errors(eq["int8_without_equalization"], task_output)
    print(f"\n{name} {'compensated' if compensated else 'uncompensated'} outliers, int8 dynamic: "
          f"without equalisation {without}; with {with_eq}")
    # The fp32 file is the original model (its last_hidden_state in the original basis).
    assert record["verify"]["files"]["model.onnx"]["max_rel_err"] <= 1e-4
    assert with_eq["agreement"] >= without["agreement"]
    if compensated:  # outliers the model gives little weight: int8 without equalisation loses the rest
        assert with_eq["task_rel_err"] * 3 <= without["task_rel_err"]
        assert with_eq["hidden_channel_median"] * 1.5 <= without["hidden_channel_median"]
        assert with_eq["hidden_channel_max"] < without["hidden_channel_max"] and with_eq["agreement"] >= 0.75
    else:  # outliers that drive the outputs (readers' rows of ordinary size): smaller gains, never worse
        assert with_eq["task_rel_err"] < without["task_rel_err"]
        assert with_eq["hidden_channel_median"] < without["hidden_channel_median"]
    # The int8 file's last_hidden_state is h / s: what --verify multiplied back.
    ids, mask, types = export.random_inputs(src.model.encoder.cfg, 2, 12, seed=5)
    session = onnxruntime.InferenceSession(str(out / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    got = export.onnx_outputs(session, ids, mask, types)[export.HIDDEN]
    ref = np.asarray(src.model(ids, types, mask)[-1].sequence_output)
    real = mask.astype(bool)
    assert rel(got[real] * s, ref[real]) < 0.5 * rel(got[real], ref[real])
    card = (out / "model_card.md").read_text()
    assert "## int8 residual equalisation" in card and "without equalisation (not written)" in card
    assert json.loads((out / "export.json").read_text())["equalization"]["scales"] == eq["scales"]


@pytest.mark.slow
def test_cli_equalize_flags(tmp_path, capsys):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text(VOCAB)
    run = fake_finetune_run(str(tmp_path / "run"), outlier_model("test_mobilebert", False), "sst2", "classification",
                            str(vocab))
    out = tmp_path / "eq"
    assert export.run([f"--from={run}", f"--to={out}", "--format=onnx", "--quantize=dynamic", "--seq_len=16",
                       "--calibration=8"]) == 0
    assert "(int8 residual-equalised: " in capsys.readouterr().out
    eq = json.loads((out / "export.json").read_text())["equalization"]
    assert eq["applied"] and eq["calibration_sequences"] == 8 and "int8_without_equalization" not in eq
    out = tmp_path / "plain"
    assert export.run([f"--from={run}", f"--to={out}", "--format=onnx", "--quantize=dynamic", "--seq_len=16",
                       "--no-equalize"]) == 0
    record = json.loads((out / "export.json").read_text())
    assert record["equalization"] == {"applied": False}
    assert "residual equalisation: no" in (out / "model_card.md").read_text()
    out = tmp_path / "fp32"
    assert export.run([f"--from={run}", f"--to={out}", "--format=hf"]) == 0
    assert "equalization" not in json.loads((out / "export.json").read_text())
    capsys.readouterr()
    ln_run = fake_finetune_run(str(tmp_path / "ln"), build("test_bert", "cls"), "sst2", "classification", str(vocab))
    for args, expected in (([f"--from={ln_run}", "--quantize=dynamic", "--equalize"], "--equalize: residual "
                            "equalisation needs normalization_type='no_norm'"),
                           ([f"--from={run}", "--equalize"], "--equalize rescales the int8 file"),
                           ([f"--from={run}", "--quantize=dynamic", "--calibration=0"], "--calibration=0; valid: 1..")):
        assert export.run([*args, f"--to={tmp_path / 'bad'}"]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "bad").exists() and not [p for p in os.listdir(tmp_path) if ".partial-" in p]
