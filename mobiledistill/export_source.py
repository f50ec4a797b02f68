"""Where an export starts: a finished fine-tuning run/seed or pipeline stage, loaded as a float32 model (SPEC §13)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any


class ExportError(ValueError):
    """Bad input: the run, a flag value, the output directory or a missing runtime package."""


@dataclasses.dataclass
class Source:
    """The model to export (float32), its tokenizer path and labels, and where it came from."""

    kind: str  # 'classification' | 'span' | 'pretraining'
    model: Any
    tokenizer: str
    label_names: list[str] | None
    task: str | None
    description: str
    # A QAT run (mobiledistill.qat): `model` is its float model; here {'model': the fake-quant model, 'ranges',
    # 'per_channel', 'weight_levels'} (the grids --quantize=int8 writes); None otherwise.
    qat: dict | None = None


def _finetune_source(path) -> Source:
    from flax import nnx

    from mobiledistill.data.glue import GLUE_TASKS
    from mobiledistill.finetune.sources import finished_run_dir, load_finetuned, read_model_json

    workdir, run_dir = finished_run_dir(path)
    info = read_model_json(workdir)
    t = load_finetuned(run_dir, dtype="float32")
    names = info.get("label_names")  # recorded by newer runs (custom tasks too); older ones: the GLUE table
    task = GLUE_TASKS.get(str(info["task"]).lower().replace("-", "").replace("_", ""))
    if not names and task is not None and task.label_names is not None:
        names = list(task.label_names)
    if names is not None and len(names) != info["num_labels"]:  # e.g. Pea-KD PTP's 4-way labels
        names = None
    kind = "span" if info["kind"] == "span" else "classification"
    from mobiledistill import qat

    model = nnx.merge(t.graphdef, t.params)
    float_model, grids = qat.strip(model)
    return Source(kind, float_model, info["tokenizer"], names, info["task"],
                  f"fine-tuned {info['task']} model{' (QAT)' if grids else ''}, {run_dir}",
                  None if grids is None else {"model": model, **grids})


def _stage_source(stage_dir) -> Source:
    import ml_collections
    from flax import nnx

    from mobiledistill import checkpoint as ckpt
    from mobiledistill import config as config_lib
    from mobiledistill.data import load_tokenizer
    from mobiledistill.finetune.sources import _as_state
    from mobiledistill.models import PreTrainingModel
    from mobiledistill.strategies import build_stages

    workdir = stage_dir.parent
    pc = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    teacher = config_lib.model_config(pc.teacher, "float32")
    student = config_lib.model_config(pc.student, "float32")
    stages = {s.name: s for s in build_stages(pc, teacher, student)}
    if stage_dir.name not in stages:
        raise ExportError(f"--from={stage_dir}: {workdir} has no stage {stage_dir.name!r}; stages: "
                          f"{', '.join(stages)}")
    if ckpt.stage_done(stage_dir) is None:
        raise ExportError(f"--from={stage_dir}: stage {stage_dir.name} has not finished (no done.json)")
    cfg = teacher if stages[stage_dir.name].trains == "teacher" else student
    vocab = str(workdir / "tokenizer") if pc.data.vocab == "train" else pc.data.vocab
    cfg = cfg.replace(vocab_size=load_tokenizer(vocab).vocab_size)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: PreTrainingModel(cfg, nnx.Rngs(0))))
    params = _as_state(abstract, ckpt.restore_final_params(stage_dir, abstract))
    return Source("pretraining", nnx.merge(graphdef, params), vocab, None, None,
                  f"stage {stage_dir.name} ({stages[stage_dir.name].trains}) of pre-training workdir {workdir}")


def load_source(path: str) -> Source:
    """The model of a finished fine-tuning run/seed or pipeline stage directory."""
    from etils import epath

    p = epath.Path(os.path.abspath(path))
    if not p.is_dir():
        raise ExportError(f"--from={path}: no such directory")
    if (p / "model.json").exists() or (p.name.startswith("seed_") and (p.parent / "model.json").exists()):
        return _finetune_source(p)
    if (p.parent / "config.json").exists() and (p.parent / "fingerprint").exists():
        return _stage_source(p)
    if (p / "config.json").exists() and (p / "fingerprint").exists():
        raise ExportError(f"--from={path} is a pipeline workdir: name one of its finished stages, e.g. "
                          f"{os.path.join(path, 'pd')}")
    raise ExportError(f"--from={path}: neither a fine-tuning run (model.json) nor a pipeline stage directory")
