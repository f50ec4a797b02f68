"""The random kill sweep (benchmarks/kill_sweep.py) at 3 points: SIGKILL at seeded random moments of a tiny
pre-training pipeline and a tiny fine-tuning run, re-run to the end, final parameters and metrics bit-identical to an
uninterrupted run. The script's default 20 points write benchmarks/results/kill_sweep.json."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import kill_sweep  # noqa: E402


def test_three_random_kills_resume_bit_identically(tmp_path):
    out = tmp_path / "kill_sweep.json"
    assert kill_sweep.main(["--points=3", f"--out={out}"]) == 0
    summary = json.loads(out.read_text())
    assert summary["points"] == 3 and len(summary["results"]) == 3
    assert {r["recipe"] for r in summary["results"]} == {"pipeline", "finetune"}
    assert summary["all_identical"] and all(r["identical"] for r in summary["results"])
    assert all(r["reruns"] >= 1 for r in summary["results"])
