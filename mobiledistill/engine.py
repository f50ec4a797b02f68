"""One engine for every config: a recipe -> an ordered list of stages -> plan, run (resume), hand off, report.

A recipe lists its stages in `c.stages` (names, in order); each name is a section `c.<name>` of one kind:

    pretrain   a pre-training pipeline (teacher, layer-wise transfer, PD, ...: configs/progressive.py and kin);
               its own stages live in <workdir>/<name>/<stage>
    finetune   fine-tuning, task KD, CKD, Pea-KD's PTP / PKD (configs/finetune_glue.py and kin), every seed, in
               <workdir>/<name>
    export     a finished model -> Hugging Face / ONNX (+ int8) files, verified, with the dev accuracy of each file
               (mobiledistill.export), in <workdir>/<name>

Hand-off is explicit: a section's `init_from` / `teacher_from` name an earlier stage ('pretrain/pd' = stage `pd` of
the pipeline `pretrain`); the engine writes the kind's own field from it (`init=stage:...`, `init=ptp:...`,
`distill.teacher=finetune:...`) and refuses a reference to a missing or later stage when it plans. A config without
`stages` (every single-job config) is a one-stage recipe run in the workdir itself, exactly as before.

The engine holds the workdir (one writer), checks the recipe's fingerprint, skips finished stages, resumes the
interrupted one (each stage resumes from its own checkpoints), and writes `report.md` comparing every model the
recipe produced: parameters, FLOPs, accuracy, file size and latency. SIGTERM and non-finite losses stop a stage the
same way in every kind (train.SigtermFlag, train.log_metrics).
"""

from __future__ import annotations

import ml_collections
from etils import epath

from mobiledistill import checkpoint as ckpt
from mobiledistill import export_stage, finetune, pipeline, recipe_plan, recipe_report, task_plan, workdir_lock
from mobiledistill.errors import ConfigError
from mobiledistill.recipe_plan import RecipeStage, plan  # noqa: F401 (public names)


def _resolve(stage: RecipeStage, stages: dict[str, RecipeStage], workdir: epath.Path) -> ml_collections.ConfigDict:
    """The stage's config with its inputs written as paths of this workdir (and patience layers mapped)."""
    c = stage.config
    if stage.kind == "pretrain":
        return c
    c = ml_collections.ConfigDict(c.to_dict())  # a copy; the recipe's own config stays as written
    if stage.kind == "export":
        c.source = recipe_plan.source_path(stage.init_from, stages, workdir)
        return c
    with c.unlocked():
        init = recipe_plan.init_field(stage.init_from, stages, workdir) if stage.init_from else None
        teacher = f"finetune:{workdir / stage.teacher_from}" if stage.teacher_from else None
        recipe_plan.write_inputs(c, stage, init, teacher)
        if stage.auto_patience:
            from mobiledistill.peakd_recipe import patience_for

            s, t = patience_for(c.init, c.distill.teacher)
            c.distill.extra_losses.patience.student_layers = s
            c.distill.extra_losses.patience.teacher_layers = t
    return c


def finished(stage: RecipeStage, c, directory: epath.Path) -> dict | None:
    """The stage's summary when `directory` holds it finished (reads only), else None."""
    if stage.kind == "pretrain":
        return pipeline.finished(c, directory, quiet=True)
    if stage.kind == "finetune":
        return task_plan.finished(c, directory)
    return export_stage.finished(directory)


def _run_stage(stage: RecipeStage, c, directory: epath.Path, allow_config_change: bool, source_config=None) -> dict:
    if stage.kind == "pretrain":
        return pipeline.run(c, str(directory), allow_config_change=allow_config_change)
    if stage.kind == "finetune":
        return finetune.run(c, str(directory), allow_config_change=allow_config_change)
    return export_stage.run(c, directory, source_config)


def run(c, workdir: str, *, allow_config_change: bool = False) -> dict:
    """Runs (or resumes) every stage of the recipe `c` in `workdir`; returns {stage name: summary}."""
    stages = plan(c)
    if len(stages) == 1 and not stages[0].directory:  # a single-job config: its runner is the whole recipe
        only = stages[0]
        return {only.name: _run_stage(only, only.config, epath.Path(workdir), allow_config_change)}
    for stage in stages:
        if stage.kind == "export":
            export_stage.check(stage.config, next((s for s in stages if s.name == stage.init_from), None))
    wd = epath.Path(workdir)
    done = _all_finished(c, stages, wd)
    if done is not None:
        return done
    with workdir_lock.hold(workdir):
        done = _all_finished(c, stages, wd)  # finished by another process while this one waited
        if done is not None:
            return done
        ckpt.check_fingerprint(wd, c.to_dict(), allow_config_change)
        by_name = {s.name: s for s in stages}
        summaries = {}
        for i, stage in enumerate(stages):
            directory = wd / stage.directory
            resolved = _resolve(stage, by_name, wd)
            prior = finished(stage, resolved, directory)
            head = f"== recipe stage {i + 1}/{len(stages)}: {stage.name} ({stage.kind}{stage.inputs_text()})"
            if prior is not None:
                print(f"{head}: finished earlier, skipped", flush=True)
                summaries[stage.name] = prior
                continue
            print(f"{head} ==", flush=True)
            source = None
            if stage.kind == "export" and by_name[stage.init_from.partition("/")[0]].kind == "finetune":
                source = _resolve(by_name[stage.init_from], by_name, wd)  # to score the files on its dev data
            summaries[stage.name] = _run_stage(stage, resolved, directory, allow_config_change, source)
        path = recipe_report.write(c, wd, stages)
        print(f"recipe report: {path}", flush=True)
        return summaries


def _all_finished(c, stages, wd: epath.Path) -> dict | None:
    if not ((wd / "report.md").exists() and ckpt.fingerprint_matches(wd, c.to_dict())):
        return None
    by_name = {s.name: s for s in stages}
    out = {}
    for s in stages:
        try:
            summary = finished(s, _resolve(s, by_name, wd), wd / s.directory)
        except (ConfigError, ckpt.CheckpointError, OSError, ValueError):
            return None
        if summary is None:
            return None
        out[s.name] = summary
    print(f"nothing to do: all {len(stages)} recipe stages in {wd} are finished; report: {wd / 'report.md'}",
          flush=True)
    return out


def describe(c, num_devices: int) -> str:
    """The dry-run plan of every stage: sizes, FLOPs, memory, inputs (nothing is read from a workdir)."""
    return recipe_plan.describe(c, num_devices)

