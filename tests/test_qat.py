"""int8 beyond dynamic (issue #11): weight-only and static int8 ONNX files, and QAT whose ranges the static-int8
file uses (mobiledistill.qat, mobiledistill.finetune.qat, mobiledistill.export_int8).

The acceptance check: a QAT fine-tuning run's `--quantize=int8` ONNX file computes the run's JAX fake-quant forward
within one quantisation step of each output (measured: ~1e-4 steps). The export runtimes are required (never skipped).
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import onnx
import onnxruntime  # the export runtimes must be installed: fail loudly, never skip
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from mobiledistill import engine, export, export_int8, finetune, qat
from mobiledistill.errors import ConfigError
from mobiledistill.models import SequenceClassificationModel, preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))

import finetune_glue  # noqa: E402
from test_export import fake_finetune_run  # noqa: E402

VOCAB = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n" + "".join(f"w{i}\n" for i in range(92))


# ---------------------------------------------------------------------------------------------------------------
# Fake quantisation against a NumPy reference

def _np_fake_quant(x, lo, hi):
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = np.float32((np.float32(hi) - np.float32(lo)) / np.float32(255))
    zp = np.clip(np.round(-128 - np.float32(lo) / scale), -128, 127)
    q = np.clip(np.round(x / scale) + zp, -128, 127)
    inside = (np.round(x / scale) + zp >= -128) & (np.round(x / scale) + zp <= 127)
    return ((q - zp) * scale).astype(np.float32), inside.astype(np.float32)


def test_fake_quant_forward_and_straight_through_gradient():
    rng = np.random.default_rng(0)
    x = rng.uniform(-4, 5, 2000).astype(np.float32)
    for lo, hi in ((-1.5, 2.5), (0.3, 3.0), (-2.0, -0.5)):  # ranges are widened to contain 0
        ref, inside = _np_fake_quant(x, lo, hi)
        got = np.asarray(qat.fake_quant(jnp.asarray(x), jnp.float32(lo), jnp.float32(hi)))
        np.testing.assert_array_equal(got, ref)
        grad = np.asarray(jax.grad(lambda v: jnp.sum(qat.fake_quant(v, lo, hi)))(jnp.asarray(x)))
        np.testing.assert_array_equal(grad, inside)  # identity inside the range, zero outside
        assert 0 < inside.mean() < 1
        scale, zp = qat.act_qparams(jnp.float32(lo), jnp.float32(hi))
        assert float(zp) == round(float(zp)) and -128 <= float(zp) <= 127
    # LSQ: the range gets a gradient (learned ranges), the clipped values pull it outwards.
    g = jax.grad(lambda lh: jnp.sum(qat.fake_quant(jnp.asarray(x), lh[0], lh[1])))(jnp.array([-1.0, 1.0]))
    assert g[0] < 0 < g[1]
    # Weights: symmetric per output channel, the same grid as the exported file, identity gradient.
    w = rng.standard_normal((16, 8)).astype(np.float32)
    for levels in (127, 63):
        q, s = export_int8.weight_grid(w, True, levels)
        np.testing.assert_allclose(np.asarray(qat.fake_quant_weight(jnp.asarray(w), True, levels)),
                                   q.astype(np.float32) * s, rtol=1e-6, atol=0)
        np.testing.assert_array_equal(q, np.clip(np.round(w / (np.abs(w).max(0) / levels)), -levels, levels))
        assert np.abs(q).max() == levels and s.shape == (8,)
        gw = jax.grad(lambda v: jnp.sum(qat.fake_quant_weight(v, True, levels) * 3.0))(jnp.asarray(w))
        np.testing.assert_allclose(np.asarray(gw), np.full_like(w, 3.0), rtol=1e-6)


@pytest.mark.slow
def test_qat_from_a_fine_tuned_run_with_learned_ranges(tmp_path):
    """init='finetune:<run>' copies encoder and head; range='learned' moves the ranges from their calibration."""
    with tfds.testing.mock_data(num_examples=16):
        finetune.run(finetune_glue.get_config("task=sst2,tiny=1,seeds=1,init=preset:test_mobilebert"),
                     str(tmp_path / "ft"))
    run = _qat_finetune(tmp_path / "qat", init=f"finetune:{tmp_path}/ft", range_mode="learned", epochs=2)
    saved = json.load(open(os.path.join(run, "seed_0", qat.RANGES_FILE)))
    assert saved["settings"]["range"] == "learned"
    ft = finetune.load_finetuned(str(tmp_path / "ft"))
    q = finetune.load_finetuned(run)
    # Calibrated again from the copied model, then trained: the learned ranges are not the calibrated ones.
    from mobiledistill.finetune import qat as ft_qat
    c = finetune_glue.get_config("task=sst2,tiny=1")
    c.qat = finetune.qat_config()
    c.qat.calibration_batches = 2
    assert ft_qat.lr_rules(c)[0][1] == 0.0
    c.qat.range = "learned"
    assert ft_qat.lr_rules(c)[0][1] == 100.0
    assert set(nnx.to_pure_dict(q.params)["classifier"]) == {"kernel", "bias", qat.RANGE}
    assert set(nnx.to_pure_dict(ft.params)["classifier"]) == {"kernel", "bias"}
    out = tmp_path / "int8"
    assert export.run([f"--from={run}", f"--to={out}", "--format=onnx", "--quantize=int8", "--seq_len=16",
                       "--verify", "--repeats=1"]) == 0
    steps = json.load(open(out / "export.json"))["int8"]["vs_qat_forward"]["max_err_in_output_steps"]
    assert max(steps.values()) < 1.0, steps


def test_convert_strip_and_calibrate():
    cfg = preset("test_mobilebert")
    model = qat.convert(SequenceClassificationModel(cfg, 2, nnx.Rngs(0)), levels=63)
    assert qat.is_qat(model) and len(qat.linears(model)) == 32
    ids, mask, types = export.random_inputs(cfg, 4, 12)
    batch = dict(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask), token_type_ids=jnp.asarray(types))
    from mobiledistill.steps import forward
    graphdef, params = nnx.split(model)
    params = qat.calibrate(graphdef, params, [batch, batch], lambda m, b: forward(m, b), momentum=0.5)
    model = nnx.merge(graphdef, params)
    r = qat.ranges(model)
    assert all(v["lo"] <= 0 <= v["hi"] and v["hi"] > v["lo"] for v in r.values())
    float_model, info = qat.strip(model)
    assert not qat.is_qat(float_model) and info["weight_levels"] == 63 and info["per_channel"]
    assert qat.is_qat(model)  # strip copies
    assert set(nnx.to_pure_dict(nnx.state(float_model))["classifier"]) == {"kernel", "bias"}


# ---------------------------------------------------------------------------------------------------------------
# QAT fine-tuning -> static int8 ONNX computing the fake-quant forward (the acceptance criterion)

def _qat_finetune(workdir, init="preset:test_mobilebert", range_mode="ema", epochs=2):
    with tfds.testing.mock_data(num_examples=16):
        c = finetune_glue.get_config(f"task=sst2,tiny=1,seeds=1,init={init}")
        if init.startswith("finetune:"):
            c.tokenizer = ""  # the fine-tuned run's vocab
        c.qat = finetune.qat_config()
        c.qat.calibration_batches = 2
        c.qat.range = range_mode
        c.train.epochs = epochs
        finetune.run(c, str(workdir))
    return str(workdir)


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    """A QAT fine-tuning run (tiny SST-2 on mock data, MobileBERT-shaped), 2 epochs of 2 steps."""
    return _qat_finetune(tmp_path_factory.mktemp("qat") / "run")


def test_qat_trains_and_saves_its_ranges(qat_run):
    losses = [json.loads(line)["loss"] for line in open(os.path.join(qat_run, "seed_0", "metrics.jsonl"))
              if '"loss"' in line]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    info = json.load(open(os.path.join(qat_run, "model.json")))
    assert info["qat"]["range"] == "ema"
    saved = json.load(open(os.path.join(qat_run, "seed_0", qat.RANGES_FILE)))
    assert len(saved["ranges"]) == 32 and "[-63, 63]" in saved["weights"]
    t = finetune.load_finetuned(qat_run)  # the checkpoint holds the same ranges (frozen: range='ema')
    ranges = qat.ranges(nnx.merge(t.graphdef, t.params))
    assert ranges == saved["ranges"]
    assert all(r["hi"] > r["lo"] for r in ranges.values())


def test_qat_int8_onnx_computes_the_fake_quant_forward(qat_run, tmp_path, capsys):
    out = tmp_path / "int8"
    assert export.run([f"--from={qat_run}", f"--to={out}", "--format=hf,onnx", "--quantize=int8", "--seq_len=16",
                       "--verify", "--repeats=1"]) == 0
    record = json.load(open(out / "export.json"))
    int8 = record["int8"]
    assert int8["mode"] == "int8" and int8["ranges"] == "qat" and int8["dense_nodes"] == 32
    assert record["equalization"] == {"applied": False}  # the trained basis is kept
    steps = int8["vs_qat_forward"]["max_err_in_output_steps"]
    print(f"\nQAT int8 file vs the JAX fake-quant forward, in output quantisation steps: {steps}")
    assert max(steps.values()) < 1.0, steps
    assert int8["vs_qat_forward"]["outputs"]["logits"]["argmax_agreement"] == 1.0
    files = record["verify"]["files"]
    assert files["model.onnx"]["max_rel_err"] <= 1e-4 and files["hf"]["max_rel_err"] <= 1e-4  # fp32: the model
    assert files["model.int8.onnx"]["precision"] == "int8_static"
    m = onnx.load(str(out / "model.int8.onnx"))
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("QuantizeLinear") == 32 and ops.count("DequantizeLinear") == 64
    assert "| `model.int8.onnx` | onnxruntime | int8_static |" in (out / "model_card.md").read_text()
    capsys.readouterr()
    assert export.run([f"--from={qat_run}", f"--to={tmp_path / 'bad'}", "--quantize=int8", "--equalize"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "QAT run's int8 file uses its trained ranges" in err
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------------------------
# weight_only and calibrated static int8 from a plain run


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("plain")
    (base / "vocab.txt").write_text(VOCAB)
    model = SequenceClassificationModel(preset("test_mobilebert_tiny"), 3, nnx.Rngs(1))
    return fake_finetune_run(str(base / "run"), model, "sst2", "classification", str(base / "vocab.txt"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["weight_only", "int8"])
def test_weight_only_and_static_int8_round_trip(plain_run, tmp_path, mode):
    out = tmp_path / mode
    assert export.run([f"--from={plain_run}", f"--to={out}", "--format=onnx", f"--quantize={mode}", "--seq_len=16",
                       "--verify", "--repeats=1", "--calibration=16"]) == 0
    record = json.load(open(out / "export.json"))
    assert record["quantize"] == mode and record["int8"]["mode"] == mode
    files = record["verify"]["files"]
    assert files["model.onnx"]["max_rel_err"] <= 1e-4  # the fp32 file is untouched
    r = files["model.int8.onnx"]
    agree = r["outputs"]["logits"]["argmax_agreement"]
    print(f"\n{mode}: argmax agreement {agree}, max rel err {r['max_rel_err']:.3g}, hidden worst channel "
          f"{r['outputs'][export.HIDDEN]['per_channel']['max']:.3g}")
    assert 0.5 <= agree <= 1 and r["outputs"][export.HIDDEN]["per_channel"]["channels"] == 32
    m = onnx.load(str(out / "model.int8.onnx"))
    ops = [n.op_type for n in m.graph.node]
    int8_weights = [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert len(int8_weights) == record["int8"]["dense_nodes"] + len(record["int8"]["embeddings"]["tables"]) > 10
    tables = record["int8"]["embeddings"]["tables"]  # word, position and token-type tables stored int8 too
    assert len(tables) == 3 and record["int8"]["embeddings"]["rows"] >= 97 + 16
    assert not [t.name for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2
                and t.dims[0] >= 97 and t.dims[1] > 1], "a float table is left (the [rows, 1] scales stay float)"
    if mode == "weight_only":
        assert r["precision"] == "int8_weight_only" and "QuantizeLinear" not in ops
        assert record["equalization"] == {"applied": False} and r["max_rel_err"] < 0.05
    else:  # NoNorm: calibrated on the residual-equalised model by default, the plain one reported beside it
        assert r["precision"] == "int8_static" and "QuantizeLinear" in ops and record["int8"]["ranges"] == "calibration"
        eq = record["equalization"]
        assert eq["applied"] and "int8_without_equalization" in eq and record["int8"]["calibration_sequences"] == 16


def test_int8_embedding_lookup_is_the_dequantised_table(plain_run, tmp_path):
    """`export_int8.quantize_embeddings` (int8 per row, looked up then scaled) computes what the fp32 graph computes
    with each table replaced by its dequantised copy q * scale, and that copy is within half a step of the table."""
    from onnx import numpy_helper

    out = tmp_path / "fp32"
    assert export.run([f"--from={plain_run}", f"--to={out}", "--format=onnx", "--seq_len=16"]) == 0
    fp32 = onnx.load(str(out / "model.onnx"))
    tables = export_int8.embedding_tables(fp32)
    assert len(tables) == 3  # word, position, token type
    q8 = str(tmp_path / "q8.onnx")
    onnx.save_model(fp32, q8)
    rec = export_int8.quantize_embeddings(q8)
    assert rec["tables"] == sorted(tables)
    dq = onnx.load(str(out / "model.onnx"))
    for t in dq.graph.initializer:
        if t.name in tables:
            w = numpy_helper.to_array(t).astype(np.float32)
            scale = np.max(np.abs(w), axis=1, keepdims=True) / 127.0
            scale[scale == 0] = 1.0
            deq = np.clip(np.round(w / scale), -127, 127) * scale
            assert np.all(np.abs(deq - w) <= scale / 2 + 1e-7)
            t.CopyFrom(numpy_helper.from_array(deq.astype(np.float32), t.name))
    ref = str(tmp_path / "dequantised.onnx")
    onnx.save_model(dq, ref)
    ids, mask, types = export.random_inputs(export.load_source(plain_run).model.encoder.cfg, 3, 16)
    feed = dict(zip(export.INPUTS, (ids, mask, types)))
    got, want = (onnxruntime.InferenceSession(p, providers=["CPUExecutionProvider"]).run(None, feed) for p in (q8, ref))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    assert os.path.getsize(q8) < os.path.getsize(ref)


def test_bad_quantize_input_one_line_exit_2(plain_run, tmp_path, capsys):
    for args, expected in (
            (["--quantize=int4"], "--quantize=int4; valid: none, dynamic, weight_only, int8"),
            (["--format=hf", "--quantize=int8"], "--quantize=int8"),
            (["--format=hf", "--quantize=weight_only"], "add onnx to --format"),
            (["--quantize=weight_only", "--equalize"], "--quantize=weight_only keeps the activations float")):
        assert export.run([f"--from={plain_run}", f"--to={tmp_path / 'out'}", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, (args, err)
    assert os.listdir(tmp_path) == []


def test_qat_config_is_checked_in_one_line():
    for key, value, expected in (("bits", 4, "qat.bits=4; valid: 8"), ("weights", "x", "qat.weights='x'"),
                                 ("activations", "per_token", "--quantize=dynamic"), ("range", "max", "'learned'"),
                                 ("ema_momentum", 1.0, "0 <= m < 1"), ("calibration_batches", 0, ">= 1")):
        c = finetune_glue.get_config("task=sst2,tiny=1")
        c.qat = finetune.qat_config()
        c.qat[key] = value
        with pytest.raises(ConfigError, match=expected.replace("(", r"\(")) as e:
            finetune.validate(c)
        assert "\n" not in str(e.value)
    c = finetune_glue.get_config("task=sst2,tiny=1")
    c.qat = finetune.qat_config()
    c.model.dtype = "bfloat16"
    with pytest.raises(ConfigError, match="model.dtype='float32'"):
        finetune.validate(c)


def test_recipe_qat_stage_starts_from_a_fine_tuned_stage():
    import progressive

    c = ml_collections.ConfigDict()
    c.pretrain = progressive.get_config("local")
    c.pretrain.kind = "pretrain"
    c.task = finetune.finetune_config()
    c.task.init_from = "pretrain/pd"
    c.qat = finetune.finetune_config()
    c.qat.qat = finetune.qat_config()
    c.qat.init_from = "task"
    c.stages = ("pretrain", "task", "qat")
    stages = engine.plan(c)
    assert stages[-1].init_from == "task"
    from mobiledistill.recipe_plan import init_field
    from etils import epath
    assert init_field("task", {s.name: s for s in stages}, epath.Path("/w")) == "finetune:/w/task/seed_0"
    c.qat.qat.enabled = False
    with pytest.raises(ConfigError, match="with qat.enabled"):
        engine.plan(c)
