"""The random kill sweep (benchmarks/kill_sweep.py) at 3 points: SIGKILL a tiny pre-training pipeline and a tiny
fine-tuning run at seeded moments of their own progress (one point as soon as an async checkpoint write is seen in
flight), re-run to the end, final parameters and metrics bit-identical to an uninterrupted run. And the comparison
can fail: a resume that restores the wrong data position is caught. The script's default 20 points write
benchmarks/results/kill_sweep.json."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import kill_sweep  # noqa: E402


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """(summary of a 3-point sweep, its scratch directory with the reference workdirs)."""
    scratch = tmp_path_factory.mktemp("kill_sweep")
    out = scratch / "kill_sweep.json"
    code = kill_sweep.main(["--points=3", f"--out={out}", f"--scratch={scratch}"])
    return code, json.loads(out.read_text()), scratch


def test_three_kills_resume_bit_identically(swept):
    code, summary, _ = swept
    results = summary["results"]
    assert code == 0 and summary["points"] == 3 and len(results) == 3
    assert {r["recipe"] for r in results} == {"pipeline", "finetune"}
    assert [r["kind"] for r in results] == ["event", "event", "async_save"]
    # every point was really killed (none finished before its kill), one inside an async checkpoint write
    assert summary["killed"] == 3 and all(r["killed"] for r in results), results
    async_point = results[2]
    assert async_point["landed"]["async_save_in_flight"] and summary["during_async_save"] >= 1, async_point
    assert any(kill_sweep.TMP in s for s in async_point["landed"]["saves_in_flight"])
    assert summary["all_identical"] and all(r["identical"] for r in results)
    for r in results:  # the re-run did something: resumed a stage, skipped a finished one, or started afresh
        assert r["reruns"] >= 1 and r["landed"]["events_seen"] >= r["target"] >= 1


@pytest.mark.slow
def test_a_broken_resume_is_not_identical(swept):
    """Kill the fine-tuning run right after its first committed checkpoint, move that checkpoint's data position
    one batch back (as a resume that restores the wrong iterator state would), re-run: the sweep's comparison must
    report a difference."""
    _, _, scratch = swept
    recipe = kill_sweep.recipes(str(scratch))["finetune"]
    reference = kill_sweep.final_state(str(scratch / "ref_finetune"), recipe)
    workdir = str(scratch / "tampered")
    w = kill_sweep.watch(recipe, workdir, lambda events, entries, saves: "seed_0/checkpoints/2" in entries)
    assert w["killed"]
    assert kill_sweep.tamper_data_state(workdir) is not None
    runs, said = kill_sweep.run_to_end(recipe, workdir)
    assert said["resumed_from"], said  # it did resume from the tampered checkpoint
    assert not kill_sweep.identical(reference, kill_sweep.final_state(workdir, recipe))
