"""`python -m mobiledistill.export --format=tflite`: LiteRT fp32 and dynamic-range int8 files, verified with --verify.

A classification run (MobileBERT-shaped: NoNorm, so the int8 file is residual-equalised), a SQuAD span run and a
pre-training stage round-trip through jax2tf -> TFLiteConverter -> the plain ai-edge-litert interpreter; a missing
TensorFlow / LiteRT is one line, exit 2. TensorFlow and ai-edge-litert are required (the `test` extra installs the
`tflite` extra): a missing one fails here at import, it is not skipped.

The runs are fabricated (no training): this module's `sst2_run` is a finished run of a random-init model with a
fixed vocab, and test_export's `span_run` / `stage_run` fixtures, imported below, build on it.
"""

import json
import os
import sys

import numpy as np
import pytest
import tensorflow  # noqa: F401  (required, see above)
from ai_edge_litert.interpreter import Interpreter
from flax import nnx
from test_export import fake_finetune_run, perturb_norms, run_export, span_run, stage_run  # noqa: F401 (fixtures)

from mobiledistill import export, export_stage, export_tflite
from mobiledistill.models import SequenceClassificationModel, preset

VOCAB = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n" + "".join(f"w{i}\n" for i in range(92))  # the test presets' 97
TOL = 1e-4


@pytest.fixture(scope="module")
def sst2_run(tmp_path_factory):
    """A finished SST-2-like run of a random NoNorm MobileBERT-shaped classifier (also the tokenizer source of
    test_export's span_run / stage_run fixtures used here)."""
    root = tmp_path_factory.mktemp("tflite_runs")
    vocab = root / "vocab.txt"
    vocab.write_text(VOCAB)
    model = perturb_norms(SequenceClassificationModel(preset("test_mobilebert"), 2, nnx.Rngs(7)))
    return fake_finetune_run(str(root / "sst2"), model, "sst2", "classification", str(vocab))


def check_tflite(out, kind, seq_len) -> dict:
    record = json.load(open(os.path.join(out, "export.json")))
    assert record["kind"] == kind
    files, lat = record["verify"]["files"], record["verify"]["latency_ms_batch1"]
    fp32, int8 = files["model.tflite"], files["model.int8.tflite"]
    assert fp32["runtime"].startswith("LiteRT") and fp32["precision"] == "fp32"
    assert fp32["max_rel_err"] <= TOL, fp32["max_rel_err"]
    h = int8["outputs"][export.HIDDEN]["per_channel"]
    assert int8["precision"] == "int8_dynamic" and h["channels"] == record["hf_config"]["hidden_size"]
    assert 0 < h["median"] <= h["max"] and np.isfinite(int8["max_rel_err"])
    assert record["files"]["model.int8.tflite"]["bytes"] < record["files"]["model.tflite"]["bytes"]
    assert lat["litert_fp32"] > 0 and lat["litert_int8_dynamic"] > 0
    assert record["versions"]["tensorflow"] == tensorflow.__version__
    card = open(os.path.join(out, "model_card.md")).read()
    for text in ("| `model.tflite` | LiteRT", "| `model.int8.tflite` | LiteRT", "| litert_fp32 |",
                 f"int32 [1, {seq_len}]", "| `model.int8.tflite` | LiteRT (ai-edge-litert) | int8_dynamic |"):
        assert text in card, text
    # The file is self-describing: one signature with the ONNX file's input and output names, fixed [1, L] int32.
    runner = Interpreter(model_path=os.path.join(out, "model.tflite")).get_signature_runner("serving_default")
    inputs = runner.get_input_details()
    assert set(inputs) == set(export.INPUTS) and all(list(d["shape"]) == [1, seq_len] for d in inputs.values())
    assert set(runner.get_output_details()) == set(export.OUTPUTS[kind] + (export.HIDDEN,))
    return record


@pytest.mark.slow
def test_tflite_classification_verified_equalised_and_scored(sst2_run, tmp_path):
    out = tmp_path / "out"
    assert run_export(f"--from={sst2_run}", f"--to={out}", "--format=tflite", "--quantize=dynamic",
                      "--seq_len=16", "--verify", "--repeats=2", "--calibration=8") == 0
    record = check_tflite(str(out), "classification", 16)
    assert sorted(os.listdir(out)) == ["export.json", "model.int8.tflite", "model.tflite", "model_card.md",
                                       "tokenizer"]
    int8 = record["verify"]["files"]["model.int8.tflite"]
    assert 0 <= int8["outputs"]["logits"]["argmax_agreement"] <= 1
    # NoNorm: the int8 file is made from the residual-equalised model; its hidden state (h / s in the file) is
    # compared in the original basis (x s), so its error stays an int8 rounding error.
    eq = record["equalization"]
    assert eq["applied"] and "residual-equalised" in record["files"]["model.int8.tflite"]["format"]
    assert int8["outputs"][export.HIDDEN]["per_channel"]["median"] < 0.1
    # The export stage scores LiteRT files like ONNX ones (rows fed one at a time, shorter rows padded to L).
    src = export.load_source(sst2_run)
    ids, mask, types = export.random_inputs(src.model.encoder.cfg, 5, 12, seed=3)
    arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    tfl = export_stage._tflite_predict(str(out / "model.tflite"), arrays)["logits"]
    ref = export.jax_outputs(src, ids, mask, types)["logits"]
    assert tfl.shape == ref.shape == (5, 2) and export.rel_err(tfl, ref) <= TOL
    c = export_stage.export_config()
    c.formats, c.quantize = "tflite", "dynamic"
    assert export_stage.check(c) == ["tflite"]


@pytest.mark.slow
@pytest.mark.parametrize("which,kind", [("span_run", "span"), ("stage_run", "pretraining")])
def test_tflite_span_and_pretraining_verified(request, tmp_path, which, kind):
    """The plain int8 recipe here (--no-equalize; the classification test covers the equalised one)."""
    src = request.getfixturevalue(which)
    src = os.path.join(src, "pd") if which == "stage_run" else src
    out = tmp_path / "out"
    assert run_export(f"--from={src}", f"--to={out}", "--format=tflite", "--quantize=dynamic", "--seq_len=12",
                      "--verify", "--repeats=1", "--no-equalize") == 0
    record = check_tflite(str(out), kind, 12)
    assert record["equalization"] == {"applied": False}
    assert sorted(os.listdir(out)) == ["export.json", "model.int8.tflite", "model.tflite", "model_card.md",
                                       "tokenizer"]
    if kind == "span":  # per-token logits, fed row by row: the rows' own padding is honoured
        ids, mask, types = export.verify_inputs(export.load_source(src), 12)
        got = export_tflite.tflite_outputs(str(out / "model.tflite"), ids, mask, types)
        assert got["start_logits"].shape == ids.shape and got[export.HIDDEN].shape[:2] == ids.shape


def test_tflite_without_its_runtime_is_one_line_exit_2(sst2_run, tmp_path, monkeypatch, capsys):
    fresh = tmp_path / "fresh"
    for module, package in (("tensorflow", "tensorflow-cpu"), ("ai_edge_litert", "ai-edge-litert")):
        with monkeypatch.context() as m:
            m.setitem(sys.modules, module, None)  # as if the package were not installed
            assert run_export(f"--from={sst2_run}", f"--to={fresh}", "--format=hf,tflite") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"needs the Python package '{package}'" in err
        assert "pip install -e '.[tflite]'" in err
    assert run_export(f"--from={sst2_run}", f"--to={fresh}", "--format=hf", "--quantize=dynamic") == 2
    assert "add onnx or tflite to --format" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_tflite_full_integer_int8_verified(sst2_run, tmp_path, capsys):
    """--quantize=int8: the converter's full-integer file (int8 weights and activations, ranges calibrated on
    --calibration sequences; int32 inputs, float outputs), made from the residual-equalised model of this NoNorm
    student and verified in LiteRT; --quantize=weight_only has no LiteRT file and is refused for tflite alone."""
    out = tmp_path / "out"
    assert run_export(f"--from={sst2_run}", f"--to={out}", "--format=tflite", "--quantize=int8", "--seq_len=16",
                      "--verify", "--repeats=1", "--calibration=8") == 0
    record = json.load(open(out / "export.json"))
    int8 = record["verify"]["files"]["model.int8.tflite"]
    assert int8["precision"] == "int8_static" and int8["runtime"].startswith("LiteRT")
    assert "full-integer int8" in record["files"]["model.int8.tflite"]["format"]
    assert record["equalization"]["applied"]
    assert 0 <= int8["outputs"]["logits"]["argmax_agreement"] <= 1 and np.isfinite(int8["max_rel_err"])
    assert 0 < int8["outputs"][export.HIDDEN]["per_channel"]["median"]
    assert record["files"]["model.int8.tflite"]["bytes"] < record["files"]["model.tflite"]["bytes"]
    assert record["verify"]["latency_ms_batch1"]["litert_int8_static"] > 0
    # Activations are int8 tensors in the file, not only the weights (the dynamic-range file has float activations).
    details = Interpreter(model_path=str(out / "model.int8.tflite")).get_tensor_details()
    quantized = [d for d in details if d["dtype"] == np.int8 and d["quantization_parameters"]["scales"].size]
    assert len(quantized) > len(nnx.state(export.load_source(sst2_run).model, nnx.Param)) // 2
    fresh = tmp_path / "fresh"
    assert run_export(f"--from={sst2_run}", f"--to={fresh}", "--format=tflite", "--quantize=weight_only") == 2
    assert "LiteRT's converter has no weight-only int8" in capsys.readouterr().err and not fresh.exists()
