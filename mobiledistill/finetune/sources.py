"""Models of a fine-tuning run: the task model, where its encoder comes from (`c.init`), and teachers.

Also reads finished runs of this runner (`model.json`, the seed's final parameters): a teacher, a PTP encoder or an
export source.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from mobiledistill import checkpoint as ckpt
from mobiledistill import convert
from mobiledistill.config import MODEL_FIELDS, ConfigError
from mobiledistill.data import load_tokenizer
from mobiledistill.finetune.config import SQUAD
from mobiledistill.train import _as_state  # restored checkpoints -> State (one helper for every runner)
from mobiledistill.models import EncoderConfig, PreTrainingModel, SequenceClassificationModel, SpanModel, preset


def _kind(task: str) -> str:
    return "span" if task == SQUAD else "classification"


def new_task_model(kind: str, cfg: EncoderConfig, num_labels: int, seed, qat: dict | None = None) -> nnx.Module:
    """A randomly initialised task model; `seed` is an int or a key; `qat`: the settings of a QAT run (its
    fake-quant Linears, `mobiledistill.finetune.qat`)."""
    rngs = nnx.Rngs(seed)
    model = SpanModel(cfg, rngs) if kind == "span" else SequenceClassificationModel(cfg, num_labels, rngs)
    if qat:
        from mobiledistill.finetune.qat import convert
        convert(model, qat)
    return model


def copy_matching(dst: nnx.State, src: nnx.State, what: str) -> None:
    """Copies every parameter of `dst` from the same path in `src` (shapes must agree) in place."""
    source = {tuple(p): v for p, v in nnx.to_flat_state(src)}
    missing, shapes = [], []
    for p, v in nnx.to_flat_state(dst):
        s = source.get(tuple(p))
        if s is None:
            missing.append("/".join(map(str, p)))
        elif tuple(s.shape) != tuple(v.shape):
            shapes.append(f"{'/'.join(map(str, p))} {tuple(s.shape)} vs {tuple(v.shape)}")
        else:
            v.set_value(jnp.array(s.get_value() if hasattr(s, "get_value") else s))  # copy: donated by each seed
    if missing or shapes:
        raise ConfigError(f"{what} does not fit the task model's encoder: missing {missing[:4]}, shapes {shapes[:4]}")


def _model_overrides(c, allowed=None) -> dict:
    over = {k: c.model[k] for k in MODEL_FIELDS if c.model.get(k) is not None}
    if allowed is not None:
        extra = sorted(set(over) - set(allowed))
        if extra:
            raise ConfigError(f"model.{extra[0]} cannot be changed for init={c.init!r} (its encoder is copied); "
                              f"settable: {', '.join(allowed)}")
    return over


_COPY_SETTABLE = ("num_hidden_layers", "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_pooling")


def _truncated(cfg: EncoderConfig, over: dict, source: str) -> EncoderConfig:
    n = over.get("num_hidden_layers")
    if n is not None and not 1 <= n <= cfg.num_hidden_layers:
        raise ConfigError(f"model.num_hidden_layers={n}: {source} has {cfg.num_hidden_layers} layers; keep 1.."
                          f"{cfg.num_hidden_layers}")
    if cfg.layer_plan is not None and n is not None:
        raise ConfigError(f"model.num_hidden_layers cannot truncate a shared-layer (layer_plan) encoder ({source})")
    return cfg.replace(**over)


@dataclasses.dataclass
class EncoderSource:
    """Where the task model's encoder comes from: its config, parameters (None: random) and tokenizer path."""

    cfg: EncoderConfig
    params: nnx.State | None
    tokenizer: str
    description: str
    task_params: nnx.State | None = None  # init='finetune:': the whole task model (encoder and head) is copied
    task: tuple | None = None  # its (kind, num_labels)


def _read_json(path: epath.Path, what: str) -> dict:
    if not path.exists():
        raise ckpt.CheckpointError(f"{what}: {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ckpt.CheckpointError(f"{what}: {path} is not valid JSON ({e.msg})") from None


def encoder_source(c, dtype: str) -> EncoderSource:
    kind, _, rest = c.init.partition(":")
    if kind == "hf":
        over = _model_overrides(c, _COPY_SETTABLE)
        enc = convert.load_hf(rest, pretraining=False, dtype=dtype)
        cfg = _truncated(enc.cfg, over, rest)
        return EncoderSource(cfg, nnx.state(enc, nnx.Param), rest, f"Hugging Face checkpoint {rest}")
    if kind == "stage":
        from mobiledistill import config as config_lib
        from mobiledistill.strategies import build_stages

        stage_dir = epath.Path(rest)
        workdir = stage_dir.parent
        pc = ml_collections.ConfigDict(_read_json(workdir / "config.json", f"init={c.init}"))
        teacher = config_lib.model_config(pc.teacher, dtype)
        student = config_lib.model_config(pc.student, dtype)
        stages = {s.name: s for s in build_stages(pc, teacher, student)}
        if stage_dir.name not in stages:
            raise ConfigError(f"init={c.init!r}: {workdir} has no stage {stage_dir.name!r}; stages: "
                              f"{', '.join(stages)}")
        cfg = teacher if stages[stage_dir.name].trains == "teacher" else student
        vocab = str(workdir / "tokenizer") if pc.data.vocab == "train" else pc.data.vocab
        cfg = cfg.replace(vocab_size=load_tokenizer(vocab).vocab_size)
        abstract = nnx.state(nnx.eval_shape(lambda: PreTrainingModel(cfg, nnx.Rngs(0))), nnx.Param)
        restored = _as_state(abstract, ckpt.restore_final_params(stage_dir, abstract))
        params = restored["encoder"]
        return EncoderSource(_truncated(cfg, _model_overrides(c, _COPY_SETTABLE), c.init), params, vocab,
                             f"stage {stage_dir.name} of {workdir}")
    if kind == "ptp":
        workdir, run_dir = finished_run_dir(epath.Path(rest))
        info = read_model_json(workdir)
        cfg = _truncated(info["encoder"].replace(dtype=dtype), _model_overrides(c, _COPY_SETTABLE[1:]), c.init)
        best = ckpt.read_npz(run_dir / "best_encoder.npz", "Pea-KD PTP encoder")  # host arrays: copied per seed
        params = nnx.from_flat_state({tuple(int(q) if q.isdigit() else q for q in k.split("/")): v
                                      for k, v in best.items()})
        return EncoderSource(cfg, params, info["tokenizer"], f"Pea-KD PTP encoder of {run_dir}")
    if kind == "finetune":
        t = load_finetuned(rest, dtype)
        cfg = _truncated(t.cfg, _model_overrides(c, _COPY_SETTABLE[1:]), c.init)
        return EncoderSource(cfg, t.params["encoder"], t.tokenizer, f"fine-tuned run {rest}", t.params,
                             (t.kind, t.num_labels))
    return EncoderSource(preset_config(c, rest, dtype), None, "", f"preset {rest} (random init)")


def preset_config(c, name: str, dtype: str) -> EncoderConfig:
    """The encoder config of `init=preset:<name>` with the section's `model.*` overrides."""
    over = _model_overrides(c)
    over.pop("dtype", None)
    try:
        return preset(name, **over, dtype=dtype)
    except ValueError as e:
        raise ConfigError(str(e)) from None


@dataclasses.dataclass
class Teacher:
    kind: str
    cfg: EncoderConfig
    num_labels: int
    graphdef: Any
    params: Any
    tokenizer: str
    description: str


def _hf_task_teacher(directory: str, kind: str, num_labels: int, dtype: str) -> Teacher:
    """A fine-tuned transformers BertForSequenceClassification / ...ForQuestionAnswering directory."""
    cfg_path = epath.Path(directory) / "config.json"
    cfg = convert.config_from_hf(_read_json(cfg_path, "distill.teacher"), dtype=dtype)
    sd = convert.read_safetensors(str(epath.Path(directory) / "model.safetensors"))
    model = new_task_model(kind, cfg, num_labels, 0)
    head = "qa_outputs" if kind == "span" else "classifier"
    if f"{head}.weight" not in sd:
        raise convert.ConversionError(f"{directory}: no '{head}.weight' tensor: not a fine-tuned "
                                      f"{'question-answering' if kind == 'span' else 'classification'} checkpoint")
    w, b = np.asarray(sd[f"{head}.weight"], np.float32), np.asarray(sd[f"{head}.bias"], np.float32)
    layer = model.qa_outputs if kind == "span" else model.classifier
    if w.T.shape != tuple(layer.kernel.shape):
        raise convert.ConversionError(f"{directory}: {head}.weight has shape {w.shape}, the task needs "
                                      f"{tuple(reversed(layer.kernel.shape))} ({num_labels} labels)")
    convert.load_hf_state_dict(model.encoder, {k: v for k, v in sd.items() if not k.startswith(head)})
    layer.kernel.set_value(jnp.asarray(w.T))
    layer.bias.set_value(jnp.asarray(b))
    graphdef, params = nnx.split(model)
    return Teacher(kind, cfg, num_labels, graphdef, params, directory, f"Hugging Face {directory}")


def read_model_json(workdir: epath.Path) -> dict:
    info = _read_json(workdir / "model.json", "fine-tuned model")
    enc = dict(info["encoder"])
    if enc.get("layer_plan") is not None:
        enc["layer_plan"] = tuple(tuple(x) for x in enc["layer_plan"])
    info["encoder"] = EncoderConfig(**enc)
    return info


def finished_run_dir(path: epath.Path) -> tuple[epath.Path, epath.Path]:
    """(workdir, seed directory) of a finished fine-tuning run: `<workdir>` (its first finished seed) or
    `<workdir>/seed_<s>`."""
    if path.name.startswith("seed_") and (path.parent / "model.json").exists():
        run_dir, workdir = path, path.parent
    else:
        workdir = path
        info = read_model_json(workdir)
        done = [workdir / f"seed_{s}" for s in info.get("seeds", []) if ckpt.stage_done(workdir / f"seed_{s}")]
        if not done:
            raise ckpt.CheckpointError(f"{workdir}: no finished fine-tuning seed (no seed_*/done.json)")
        run_dir = done[0]
    if ckpt.stage_done(run_dir) is None:
        raise ckpt.CheckpointError(f"{run_dir}: this fine-tuning run has not finished (no done.json)")
    return workdir, run_dir


def load_finetuned(path: str | epath.Path, dtype: str | None = None) -> Teacher:
    """A finished run of this runner: its model.json and the final parameters of the seed's checkpoint."""
    workdir, run_dir = finished_run_dir(epath.Path(path))
    info = read_model_json(workdir)
    cfg = info["encoder"] if dtype is None else info["encoder"].replace(dtype=dtype)
    model = nnx.eval_shape(lambda: new_task_model(info["kind"], cfg, info["num_labels"], 0, info.get("qat")))
    graphdef, abstract = nnx.split(model)
    params = _as_state(abstract, ckpt.restore_final_params(run_dir, abstract))
    return Teacher(info["kind"], cfg, info["num_labels"], graphdef, params, info["tokenizer"],
                   f"fine-tuned {run_dir}")


def load_teacher(c, kind: str, num_labels: int, src: str | None = None) -> Teacher | None:
    src = c.distill.teacher if src is None else src
    if not src:
        return None
    dtype = c.model.dtype
    if src.startswith("hf:"):
        t = _hf_task_teacher(src[3:], kind, num_labels, dtype)
    else:
        t = load_finetuned(src[len("finetune:"):], dtype)
    if t.kind != kind or t.num_labels != num_labels:
        raise ConfigError(f"distill.teacher {src}: a {t.kind} model with {t.num_labels} outputs, but task "
                          f"{c.task} needs a {kind} model with {num_labels}")
    return t


# Public names of the engine's planning (mobiledistill.recipe_plan, task_plan).
COPY_SETTABLE = _COPY_SETTABLE
model_overrides = _model_overrides
truncated = _truncated
