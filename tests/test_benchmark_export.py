"""benchmarks/export.py on a tiny finished fine-tuning run: one entry per route (formats and modes read from
mobiledistill.export), failures recorded rather than raised, accuracy / size / latency fields present (no times are
asserted: they depend on the machine's load)."""

import json
import os

import pytest
import tensorflow_datasets as tfds

from mobiledistill import export
from test_benchmark_inference import load_benchmark
from test_export import sst2_run  # noqa: F401  (the same tiny finished SST-2 run)
from test_qat import _qat_finetune

# benchmark scripts on tiny shapes: left to `-m slow` (CI runs it) to keep the default suite short
pytestmark = pytest.mark.slow




def test_export_benchmark_tiny(sst2_run, tmp_path, monkeypatch):
    bench = load_benchmark("export")
    # A format the exporter does not offer: the route is planned from FORMATS, refused, and recorded as failed.
    monkeypatch.setattr(export, "FORMATS", export.FORMATS + ("bogus",))
    out = tmp_path / "export.json"
    with tfds.testing.mock_data(num_examples=10):
        res = bench.main([f"--from={sst2_run}", f"--out={out}", "--formats=onnx,bogus", "--quantize=none,dynamic",
                          "--repeats=2", "--threads=1", "--calibration=4", f"--work={tmp_path / 'files'}"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert res["kind"] == "classification" and res["task"] == "sst2" and res["metric"] == "accuracy"
    assert res["seq_len"] == 64 and res["threads"] == 1 and res["machine"]["date"]  # capped at max positions
    routes = res["routes"]
    # NoNorm model: dynamic int8 once with residual equalisation, once without
    bogus = {"bogus_fp32", "bogus_dynamic_equalized", "bogus_dynamic_plain"}
    assert set(routes) == {"onnx_fp32", "onnx_dynamic_equalized", "onnx_dynamic_plain"} | bogus
    for name in bogus:
        assert routes[name]["error"] and "bytes" not in routes[name] and "bogus" in res["table_md"], name
    ref = res["baselines"]
    assert 0 <= ref["jax_jit_fp32"]["dev"] <= 100 and ref["pytorch_eager_fp32"]["latency_ms"] > 0
    assert ref["pytorch_eager_fp32"]["bytes"] > 0 and ref["jax_jit_fp32"]["speedup_vs_pytorch_eager"] > 0
    for name in ("onnx_fp32", "onnx_dynamic_equalized", "onnx_dynamic_plain"):
        r = routes[name]
        assert "error" not in r, (name, r)
        assert r["bytes"] > 0 and r["latency_ms"] > 0 and r["speedup_vs_pytorch_eager"] > 0, name
        assert r["speedup_vs_litert_fp32"] is None  # no LiteRT route here
        assert r["dev_change_points"] == pytest.approx(r["dev"] - ref["jax_jit_fp32"]["dev"]), name
        assert isinstance(r["qualifies"], bool), name
    assert routes["onnx_fp32"]["file"] == "model.onnx" and routes["onnx_fp32"]["size_vs_fp32"] == 1.0
    eq = routes["onnx_dynamic_equalized"]["equalization"]  # the student's outlier channels, measured
    assert eq["applied"] and eq["range_ratio_before"] >= eq["range_ratio_after"] > 0
    assert "equalization" not in routes["onnx_dynamic_plain"]
    assert routes["onnx_dynamic_plain"]["file"] == "model.int8.onnx"
    assert routes["onnx_dynamic_plain"]["size_vs_fp32"] > 0  # (int8 is larger than fp32 at this tiny size)
    assert routes["onnx_fp32"]["dev"] == ref["jax_jit_fp32"]["dev"]  # fp32 ONNX computes the JAX model
    assert res["recommended"] in res["qualifying"] or (res["recommended"] is None and not res["qualifying"])
    assert res["table_md"].count("\n| ") == len(routes) + 2  # + the JAX and PyTorch rows
    assert os.path.exists(tmp_path / "files" / "onnx_fp32" / "model.onnx")  # --work keeps the files


def test_export_benchmark_qat_route(sst2_run, tmp_path):
    """--qat_from: a QAT run started from the benchmarked run adds onnx_int8_qat, its static int8 file with the QAT
    ranges, scored and timed like the other routes; a run without QAT is refused in one line."""
    bench = load_benchmark("export")
    qat_run = _qat_finetune(tmp_path / "qat", init=f"finetune:{sst2_run}", epochs=1)
    out = tmp_path / "export.json"
    with tfds.testing.mock_data(num_examples=10):
        res = bench.main([f"--from={sst2_run}", f"--out={out}", "--formats=onnx", "--quantize=none",
                          f"--qat_from={qat_run}", "--repeats=1", "--threads=1"])
    assert set(res["routes"]) == {"onnx_fp32", "onnx_int8_qat"}
    r = res["routes"]["onnx_int8_qat"]
    assert "error" not in r, r
    assert r["file"] == "model.int8.onnx" and r["run"].endswith("qat") and "QAT run's ranges" in r["description"]
    assert 0 <= r["dev"] <= 100 and r["latency_ms"] > 0 and 0 < r["size_vs_fp32"]
    with pytest.raises(SystemExit, match="must be a QAT run"):
        bench.main([f"--from={sst2_run}", f"--out={tmp_path / 'x.json'}", f"--qat_from={sst2_run}"])
