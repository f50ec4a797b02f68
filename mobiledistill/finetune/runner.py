"""The entry points: `run` (train or resume every seed, then report), `evaluate_run` (mode='eval'), `finished`."""

from __future__ import annotations

import json

import jax
from etils import epath
from flax import nnx

from mobiledistill import checkpoint as ckpt
from mobiledistill import evaluate, workdir_lock
from mobiledistill.data import CUSTOM
from mobiledistill.finetune.config import validate
from mobiledistill.finetune.context import prepare
from mobiledistill.finetune.predict import _eval_line, _flat_metrics
from mobiledistill.finetune.qat import enabled as qat_enabled
from mobiledistill.finetune.qat import settings as qat_settings
from mobiledistill.finetune.report import run_label, write_report
from mobiledistill.finetune.sources import _as_state, new_task_model
from mobiledistill.finetune.training import evaluate_params, train_seed, write_outputs
from mobiledistill.train import SigtermFlag

# Keys that do not change what a seed computes (switching mode, adding seeds).
_FINGERPRINT_EXCLUDE = ("mode", "seeds", "train.log_every", "train.checkpoint_every")


def _fingerprint_config(c) -> dict:
    d = c.to_dict()
    if d.get("task") != CUSTOM:
        d.pop("custom", None)
    for key in _FINGERPRINT_EXCLUDE:
        head, _, tail = key.partition(".")
        if tail:
            d.get(head, {}).pop(tail, None)
        else:
            d.pop(head, None)
    return d


def run(c, workdir: str, *, allow_config_change: bool = False) -> dict:
    """Trains (or resumes) every seed of `c` in `workdir`, then writes report.md; returns {seed: summary}.

    With `c.mode == 'eval'` re-evaluates the finished seeds instead (see `evaluate_run`). The workdir has one
    writer at a time (mobiledistill.workdir_lock); a bad config is refused before the workdir is touched.
    """
    validate(c)
    # Readers take no lock, so they are never refused while another process holds the workdir: 'eval' reads the
    # finished seeds (and writes only their eval_* files, atomically; no writer touches a finished seed again), and
    # a re-run of this experiment finished has nothing to write.
    if c.mode == "eval":
        return _run(c, workdir, allow_config_change=allow_config_change)
    finished = _finished(c, epath.Path(workdir))
    if finished is not None:
        return finished
    with workdir_lock.hold(workdir):
        return _run(c, workdir, allow_config_change=allow_config_change)


def _finished(c, workdir: epath.Path, quiet: bool = False) -> dict | None:
    """{seed: summary} when `workdir` holds this experiment with every seed of `c` finished and its report written
    for exactly those seeds (reads only), else None."""
    try:
        reported = [r["seed"] for r in json.loads((workdir / "summary.json").read_text())["seeds"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if reported != list(c.seeds) or not (workdir / "report.md").exists() or \
            not ckpt.fingerprint_matches(workdir, _fingerprint_config(c)):
        return None
    summaries = {seed: ckpt.stage_done(workdir / f"seed_{seed}") for seed in c.seeds}
    if not all(summaries.values()):
        return None
    if quiet:
        return summaries
    print(f"nothing to do: every seed {list(c.seeds)} in {workdir} is finished; report: {workdir / 'report.md'}",
          flush=True)
    return summaries


def _run(c, workdir: str, *, allow_config_change: bool = False) -> dict:
    workdir = epath.Path(workdir)
    validate(c)
    if c.mode == "eval":
        return evaluate_run(c, workdir)
    ctx = prepare(c, workdir, before_writing=lambda: ckpt.check_fingerprint(
        workdir, _fingerprint_config(c), allow_config_change))
    print(f"fine-tuning {run_label(c)}: {len(ctx.data.train['input_ids'])} training rows, seeds "
          f"{list(c.seeds)}, {jax.device_count()} device(s)", flush=True)
    summaries = {}
    with SigtermFlag() as flag:
        ctx.sigterm = flag
        for i, seed in enumerate(c.seeds):
            summaries[seed] = train_seed(ctx, seed, i)
    write_report(c, workdir, ctx, summaries)
    agg = evaluate.summarize_seeds(list(summaries.values()))
    print(f"report: {workdir / 'report.md'}")
    print("  " + ", ".join(f"{k} {v['mean']:.2f} ± {v['std']:.2f}" for k, v in agg.items()
                           if k not in ("seed", "final_step", "seconds") and "thresh" not in k))
    return summaries


def evaluate_run(c, workdir: str | epath.Path) -> dict:
    """Restores every finished seed of a run and writes `eval_<split>_predictions/metrics` into its directory."""
    workdir = epath.Path(workdir)
    if not (workdir / "config.json").exists():
        raise ckpt.CheckpointError(f"{workdir} holds no fine-tuning run (no config.json); train it first")
    ctx = prepare(c, workdir)
    results = {}
    for seed in c.seeds:
        run_dir = workdir / f"seed_{seed}"
        if ckpt.stage_done(run_dir) is None:
            print(f"[seed {seed}] not finished: skipped", flush=True)
            continue
        qat = qat_settings(c) if qat_enabled(c) else None
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: new_task_model(ctx.kind, ctx.cfg,
                                                                             ctx.data.num_labels, 0, qat)))
        params = _as_state(abstract, ckpt.restore_final_params(run_dir, abstract))
        ev, written = evaluate_params(ctx, graphdef, params)
        write_outputs(run_dir, ev, written, prefix="eval_")
        results[seed] = {"seed": int(seed), **_flat_metrics(ev)}
        print(f"[seed {seed}] {_eval_line(ev)}; wrote {run_dir}/eval_*", flush=True)
    if not results:
        raise ckpt.CheckpointError(f"{workdir}: no finished seed among {list(c.seeds)} to evaluate")
    return results


# Public names of the engine's planning (mobiledistill.recipe_plan, task_plan).
finished = _finished
