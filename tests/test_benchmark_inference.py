"""benchmarks/inference.py on a tiny MobileBERT: every variant runs, agrees with PyTorch and is reported (no times
are asserted: they depend on the machine's load)."""

import json
import math

import pytest
from _benchmarks import load_benchmark

# benchmark scripts on tiny shapes: left to `-m slow` (CI runs it) to keep the default suite short
pytestmark = pytest.mark.slow


def test_inference_benchmark_tiny(tmp_path):
    bench = load_benchmark("inference")
    out = tmp_path / "inference.json"
    res = bench.main(["--preset=test_mobilebert", "--seq_len=16", "--repeats=2", "--threads=1", "--no_compile", f"--out={out}"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    m = res["machine"]
    assert m["threads"] == m["torch_threads"] >= 1 and m["jax"] and m["torch"] and m["cpu"] is not None
    assert len(m["load_average_at_start"]) == 3 and len(m["load_average_at_end"]) == 3
    assert (res["batch"], res["seq_len"], res["baseline"]) == (1, 16, "pytorch_eager_fp32")
    v = res["variants"]
    assert set(v) == {"jax_predictor", "jax_jit_state", "jax_jit_state_scan", "pytorch_eager_fp32"}
    for name, r in v.items():
        assert len(r["times_ms"]) == 2 and r["median_ms"] > 0 and 0 < r["dispatch_ms"] <= max(r["times_ms"]), name
        assert math.isfinite(r["speedup_vs_pytorch_eager"]) and r["paired_speedup_vs_pytorch_eager"] > 0, name
        assert r["max_rel_err_vs_pytorch"] < 1e-4, name  # the same logits as transformers
    assert v["pytorch_eager_fp32"]["speedup_vs_pytorch_eager"] == 1.0
