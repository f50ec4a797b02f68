"""A recipe config -> its ordered stages, their checked inputs, and the dry-run plan (see mobiledistill.engine)."""

from __future__ import annotations

import dataclasses
import json

import ml_collections
from etils import epath

from mobiledistill.errors import ConfigError

KINDS = ("pretrain", "finetune", "export")
# Keys of a recipe section that belong to the engine (hand-off), not to the kind's own config.
ENGINE_KEYS = ("init_from", "teacher_from", "auto_patience")


@dataclasses.dataclass(frozen=True)
class RecipeStage:
    """One stage of a recipe: its name (and directory under the workdir; '' = the workdir itself), kind, the
    kind's own config, and the earlier stages it reads (`init_from`: 'name' or 'pipeline/stage')."""

    name: str
    kind: str
    config: ml_collections.ConfigDict
    directory: str
    init_from: str | None = None
    teacher_from: str | None = None
    auto_patience: bool = False

    def inputs_text(self) -> str:
        parts = [f"init_from {self.init_from}"] if self.init_from else []
        parts += [f"teacher_from {self.teacher_from}"] if self.teacher_from else []
        return (": " + ", ".join(parts)) if parts else ""


def kind_of(c) -> str:
    kind = c.get("kind") or "pretrain"
    if kind not in KINDS:
        raise ConfigError(f"kind={kind!r}; valid: {', '.join(KINDS)}")
    return kind


def _names(value) -> list[str]:
    if isinstance(value, str):
        value = value.split(",")
    return [str(v).strip() for v in value if str(v).strip()]


def _section(c, name: str):
    """The kind's own config of section `name` (engine keys removed) and the engine keys' values."""
    sub = c.get(name)
    if not isinstance(sub, ml_collections.ConfigDict):
        sections = sorted(k for k, v in c.items() if isinstance(v, ml_collections.ConfigDict))
        raise ConfigError(f"stages lists {name!r} but the config has no section {name!r}; sections: "
                          f"{', '.join(sections)}")
    engine = {k: sub.get(k) for k in ENGINE_KEYS}
    own = ml_collections.ConfigDict({k: v for k, v in sub.to_dict().items() if k not in ENGINE_KEYS})
    own.lock()
    return own, engine


def pipeline_stage_names(c) -> list[str]:
    from mobiledistill import pipeline

    return [s.name for s in pipeline.plan(c)[2]]


def plan(c) -> list[RecipeStage]:
    """The recipe's stages in order; every `init_from` / `teacher_from` checked against the earlier stages."""
    names = c.get("stages")
    if names is None:
        kind = kind_of(c)
        return [RecipeStage(kind, kind, c, "")]
    names = _names(names)
    if not names:
        raise ConfigError("stages is empty: list the recipe's sections in order, e.g. stages=('pretrain', 'task')")
    if len(set(names)) != len(names):
        raise ConfigError(f"stages={names} names a stage twice")
    out: list[RecipeStage] = []
    for name in names:
        own, engine = _section(c, name)
        stage = RecipeStage(name, kind_of(own), own, name, engine["init_from"] or None,
                            engine["teacher_from"] or None, bool(engine["auto_patience"]))
        _check_inputs(stage, out)
        out.append(stage)
    return out


def _check_inputs(stage: RecipeStage, earlier: list[RecipeStage]) -> None:
    before = {s.name: s for s in earlier}
    where = f"stage {stage.name!r}"
    if stage.kind == "pretrain" and (stage.init_from or stage.teacher_from):
        raise ConfigError(f"{where}: a pretrain stage takes no init_from/teacher_from (set its teacher.source)")
    if stage.kind == "export" and not stage.init_from:
        raise ConfigError(f"{where}: an export stage needs init_from=<an earlier finetune or pipeline stage>")
    for field, ref in (("init_from", stage.init_from), ("teacher_from", stage.teacher_from)):
        if not ref:
            continue
        head, _, sub = ref.partition("/")
        if head not in before:
            raise ConfigError(f"{where}: {field}={ref!r} names no earlier stage; earlier: "
                              f"{', '.join(before) or 'none'}")
        src = before[head]
        if src.kind == "pretrain":
            subs = pipeline_stage_names(src.config)
            if field == "teacher_from" or sub not in subs:
                raise ConfigError(f"{where}: {field}={ref!r}: name one stage of pipeline {head!r} as "
                                  f"{head}/<stage>, one of {', '.join(subs)}" if field == "init_from" else
                                  f"{where}: teacher_from={ref!r}: a teacher must be a fine-tuned (finetune) stage")
        elif sub:
            raise ConfigError(f"{where}: {field}={ref!r}: {head!r} is a {src.kind} stage; name it alone")
        elif src.kind == "export":
            raise ConfigError(f"{where}: {field}={ref!r} is an export stage; name the stage it exported")
        elif field == "init_from" and stage.kind == "finetune" and src.config.get("ptp") is None \
                and not _qat(stage.config):
            raise ConfigError(f"{where}: init_from={ref!r}: a fine-tuning stage starts from a pipeline stage "
                              f"('pipeline/stage'), a Pea-KD PTP stage, or (with qat.enabled) a fine-tuned stage; "
                              f"use {head!r} as teacher_from instead")


def _qat(c) -> bool:
    return c.get("qat") is not None and bool(c.qat.get("enabled", False))


def write_inputs(c, stage: RecipeStage, init: str | None, teacher: str | None) -> None:
    """Writes a finetune section's resolved inputs into its own fields (`c` unlocked): `init`, and the teacher into
    `ptp.teacher` for a PTP stage that has none, else into `distill.teacher`."""
    if stage.init_from:
        c.init = init
    if stage.teacher_from:
        if c.get("ptp") is not None and not c.ptp.teacher:
            c.ptp.teacher = teacher
        else:
            c.distill.teacher = teacher


def init_field(ref: str, stages: dict[str, RecipeStage], workdir: epath.Path) -> str:
    """A finetune section's `init` for the reference `ref`: stage:<dir> of a pipeline stage, ptp:<run> of a PTP
    stage."""
    head, _, sub = ref.partition("/")
    src = stages[head]
    if src.kind == "pretrain":
        return f"stage:{workdir / head / sub}"
    if src.config.get("ptp") is None:  # QAT from a fine-tuned stage: its whole task model
        return f"finetune:{workdir / head}/seed_{list(src.config.seeds)[0]}"
    return f"ptp:{workdir / head}/seed_{list(src.config.seeds)[0]}"


def source_path(ref: str, stages: dict[str, RecipeStage], workdir: epath.Path) -> str:
    head, _, sub = ref.partition("/")
    return str(workdir / head / sub) if sub else str(workdir / head)


# ---------------------------------------------------------------------------------------------------------------
# Dry run


def _encoder_config(c, ref_cfg):
    """The encoder config a finetune section would train (without reading any weights)."""
    from mobiledistill import convert
    from mobiledistill import config as config_lib
    from mobiledistill.finetune import COPY_SETTABLE, model_overrides, preset_config, truncated
    from mobiledistill.strategies.peakd import paired_plan, top_layers_plan

    kind, _, rest = c.init.partition(":")
    dtype = c.model.dtype
    if ref_cfg is not None:
        cfg = truncated(ref_cfg, model_overrides(c, COPY_SETTABLE), c.init)
    elif kind == "hf":
        path = epath.Path(rest) / "config.json"
        if not path.exists():
            raise ConfigError(f"init={c.init}: {path} does not exist (give a Hugging Face model directory)")
        cfg = truncated(convert.config_from_hf(json.loads(path.read_text()), dtype=dtype),
                        model_overrides(c, COPY_SETTABLE), rest)
    elif kind == "stage":
        path = epath.Path(rest).parent / "config.json"
        if not path.exists():
            raise ConfigError(f"init={c.init}: {path} does not exist (give a finished pipeline stage)")
        pc = ml_collections.ConfigDict(json.loads(path.read_text()))
        trains = {s.name: s.trains for s in _pipeline_plan(pc)}.get(epath.Path(rest).name)
        if trains is None:
            raise ConfigError(f"init={c.init}: {epath.Path(rest).parent} has no stage {epath.Path(rest).name!r}")
        cfg = config_lib.model_config(pc.teacher if trains == "teacher" else pc.student, dtype)
        cfg = truncated(cfg, model_overrides(c, COPY_SETTABLE), c.init)
    elif kind in ("ptp", "finetune"):
        from mobiledistill.finetune import read_model_json

        path = epath.Path(rest)
        info = read_model_json(path.parent if path.name.startswith("seed_") else path)
        cfg = info["encoder"]
    else:
        cfg = preset_config(c, rest, dtype)
    if c.get("sps") and cfg.layer_plan is None:
        n = cfg.num_hidden_layers
        cfg = cfg.replace(layer_plan=paired_plan(n) if c.sps == "paired" else top_layers_plan(n, min(3, n)))
    return cfg


def _pipeline_plan(pc):
    from mobiledistill import pipeline

    return pipeline.plan(pc)[2]


def _ref_model(ref: str | None, stages: dict[str, RecipeStage]):
    """The model config an `init_from` reference hands on (None for a section's own init)."""
    if not ref:
        return None
    from mobiledistill import pipeline

    head, _, sub = ref.partition("/")
    src = stages[head]
    if src.kind == "pretrain":
        teacher, student, pstages = pipeline.plan(src.config)
        trains = {s.name: s.trains for s in pstages}[sub]
        return teacher if trains == "teacher" else student
    return _encoder_config(src.config, _ref_model(src.init_from, stages))


def describe_finetune(stage: RecipeStage, stages: dict[str, RecipeStage], num_devices: int) -> str:
    """One finetune section's plan: task, init, model size, FLOPs per sequence, steps, losses, memory."""
    from mobiledistill import finetune, perf, task_plan
    from mobiledistill.models import count_params, forward_flops
    from mobiledistill.optim import OptimizerConfig
    from mobiledistill.strategies.stage import Stage

    c = ml_collections.ConfigDict(stage.config.to_dict())
    with c.unlocked():  # placeholders of the right form: the paths exist once the earlier stages have run
        write_inputs(c, stage, f"stage:<workdir>/{stage.init_from}", f"finetune:<workdir>/{stage.teacher_from}")
    finetune.validate(c)
    cfg = _encoder_config(c, _ref_model(stage.init_from, stages))
    kind, num_labels = task_plan.task_shape(c)
    params = count_params(task_plan.abstract_task_params(kind, cfg, num_labels or 2))
    seq = c.data.max_seq_length
    flops = forward_flops(cfg, seq)
    teacher = c.distill.teacher
    t_cfg = None
    if teacher:
        if stage.teacher_from and c.distill.teacher.startswith("finetune:<workdir>/"):
            t_cfg = _encoder_config(stages[stage.teacher_from].config,
                                    _ref_model(stages[stage.teacher_from].init_from, stages))
        else:
            t_cfg = task_plan.teacher_encoder_config(teacher, c.model.dtype)
    spec, cacheable = finetune.loss_spec(c, kind, num_labels or 2, object() if teacher else None)
    micro = max(1, c.train.batch // num_devices)
    st = Stage(name=stage.name, steps=1, losses=spec, optimizer=OptimizerConfig(name="adamw"), init="fresh",
               teacher_from="t" if teacher and not cacheable else None)
    t_params = count_params(task_plan.abstract_task_params(kind, t_cfg, num_labels or 2)) if t_cfg else 0
    mem = perf.memory_estimate(st, cfg, t_cfg, params, params, t_params, micro, seq, 1)
    labels = num_labels if num_labels else "from the data"
    lines = [f"task {c.task}{' (' + kind + ')' if kind == 'span' else ''}, {labels} label(s); init {c.init}"
             + (f"; teacher {teacher} ({'logits cached once' if cacheable else 'run every step'}, "
                f"{forward_flops(t_cfg, seq) / 1e9:.2f} GFLOP/seq)" if teacher else ""),
             f"model {params:,} parameters ({len(cfg.plan)} layers x {cfg.hidden_size}), "
             f"{flops / 1e9:.3f} GFLOP per sequence of {seq} (forward; training 3x)",
             f"seeds {list(c.seeds)}, {c.train.epochs} epoch(s) x ceil(training rows / {c.train.batch}) steps, "
             f"AdamW lr {c.train.lr:g}; losses {', '.join(spec)}; about {mem['total']:.2f} GiB per device"]
    if stage.auto_patience:
        lines.append("patience layers: student 1..L-1 -> teacher PKD-skip, mapped when the PTP stage has finished")
    return "\n".join(lines)


def describe(c, num_devices: int) -> str:
    from mobiledistill import pipeline

    stages = plan(c)
    by_name = {s.name: s for s in stages}
    parts = []
    if len(stages) > 1 or stages[0].directory:
        parts.append(f"recipe: {len(stages)} stages: " + " -> ".join(f"{s.name} ({s.kind})" for s in stages))
    for s in stages:
        if len(stages) > 1 or s.directory:
            parts.append(f"\n== {s.name} ({s.kind}{s.inputs_text()}) ==")
        if s.kind == "pretrain":
            teacher, student, pstages = pipeline.plan(s.config, num_devices)
            parts.append(pipeline.describe(s.config, teacher, student, pstages, num_devices))
        elif s.kind == "finetune":
            parts.append(describe_finetune(s, by_name, num_devices))
        else:
            e = s.config
            parts.append(f"export {s.init_from}: formats {e.formats}, quantize {e.quantize}, seq_len {e.seq_len}, "
                         f"verify {bool(e.verify)}; dev accuracy of every file on {e.eval_rows or 'all'} rows")
    return "\n".join(parts)
