"""benchmarks/train_step.py's measuring pieces on tiny models: the dot-floor profile and the teacher forward."""

import jax
import pytest
from _benchmarks import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("train_step")


def test_profile_times_every_dot_of_the_step(bench):
    """The matmul floor covers every dot instruction of the compiled step, and the rest is the step minus it; the
    result of a timed step holds its loss, memory and page faults."""
    from mobiledistill import perf
    from mobiledistill.models import preset

    cfg = preset("test_mobilebert", max_position_embeddings=128)
    step, compiled, compile_s = bench.ours_step(bench.mlm_stage(), cfg, predictions=bench.P)
    res = bench.ours_result(step, compiled, compile_s, [0.5, 0.25, 1.0])
    assert res["median_ms"] == 500.0 and res["minor_page_faults"] >= 0 and res["memory"]["total_mb"] > 0
    assert jax.numpy.isfinite(res["loss"])
    prof = bench.profile(compiled, step_ms=1e3, peak=perf.measured_matmul_peak(256, repeats=2))
    dots = perf.hlo_dots(compiled.as_text())
    assert prof["dot_instructions"] == len(dots) > 0
    assert prof["dot_gflop"] == pytest.approx(sum(d["flops"] for d in dots) / 1e9)
    assert prof["dot_ms_standalone"] > 0 and prof["rest_ms"] == pytest.approx(1e3 - prof["dot_ms_standalone"])
    assert sum(r["count"] for r in prof["top_dots"]) <= len(dots)


def test_teacher_forward_scanned_and_unrolled_agree(bench):
    """Part (c)'s teacher measurement times the same forward both ways (same parameters, same outputs); both report
    MFU and the ratio."""
    from mobiledistill.models import preset

    res = bench.teacher_forward(preset("test_ib_bert", max_position_embeddings=128), repeats=2, peak=1e9)
    for name in ("unrolled", "scanned"):
        assert len(res[name]["times_ms"]) == 2 and res[name]["median_ms"] > 0 and res[name]["mfu"] > 0
        assert res[name]["compile_s"] > 0
    assert res["unrolled_speedup"] == pytest.approx(res["scanned"]["median_ms"] / res["unrolled"]["median_ms"])
    assert 0 <= res["max_abs_diff"] < 1e-4
