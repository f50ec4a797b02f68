"""benchmarks/accelerator.py runs on a CPU with tiny models and writes every field the accelerator run reports."""

import json
import math
import os
import subprocess
import sys

import pytest

from _limits import SUBPROCESS_TIMEOUT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_accelerator_benchmark_tiny_on_cpu(tmp_path):
    out = tmp_path / "acc.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "benchmarks/accelerator.py", "--tiny", "--repeats=1", "--batch=2",
           "--stages=pkt_01,pd", f"--out={out}"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["machine"]["backend"] == "cpu" and res["machine"]["datasheet"] is None
    assert res["layers"] == {"student": "scanned", "teacher": "unrolled"}  # the teacher as the pipeline runs it
    assert set(res["matmul_peak_tflops"]) == {"float32", "bfloat16"}
    for dtype in ("float32", "bfloat16"):
        stages = res["results"][dtype]["batch_2"]
        assert set(stages) == {"pkt_01", "pd"}
        for name, row in stages.items():
            assert row["median_ms"] > 0 and row["compile_s"] > 0 and math.isfinite(row["loss"]), name
            assert row["memory"]["total_mb"] > 0, name
            assert 0 < row["mfu_student_vs_measured"] < row["mfu_total_vs_measured"], name  # teacher forward counted
            assert row["mfu_total_vs_datasheet"] is None, name
        # PD trains the whole student with MLM heads; PKT at the last layer trains one layer: more FLOPs in PD
        assert stages["pd"]["student_tflop_per_step"] > stages["pkt_01"]["student_tflop_per_step"]
    bad = subprocess.run(cmd[:2] + ["--tiny", "--stages=pkt_99"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=SUBPROCESS_TIMEOUT)
    assert bad.returncode != 0 and "--stages ['pkt_99']; valid:" in bad.stderr.strip().splitlines()[-1]
