"""Preparing a run: every check (config, data, labels, teacher, init, tokenizer) before the workdir is written."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from typing import Any

import jax
from etils import epath

from mobiledistill import sharding
from mobiledistill.config import ConfigError
from mobiledistill.data import CUSTOM, load_tokenizer, trained_tokenizer
from mobiledistill.data.tokenizer import VOCAB_FILE
from mobiledistill.finetune.config import validate
from mobiledistill.finetune.losses import loss_spec
from mobiledistill.finetune.predict import make_predict, predict_arrays
from mobiledistill.finetune.qat import check_model as check_qat_model
from mobiledistill.finetune.qat import enabled as qat_enabled
from mobiledistill.finetune.qat import settings as qat_settings
from mobiledistill.finetune.sources import EncoderSource, Teacher, _kind, encoder_source, load_teacher
from mobiledistill.finetune.taskdata import TaskData, build_features, load_examples, task_texts
from mobiledistill.models import EncoderConfig
from mobiledistill.strategies.peakd import PTP_NUM_LABELS, paired_plan, ptp_labels, top_layers_plan


@dataclasses.dataclass
class Context:
    c: Any
    workdir: epath.Path
    kind: str
    cfg: EncoderConfig
    source: EncoderSource
    data: TaskData
    teacher: Teacher | None
    spec: dict
    mesh: Any
    peak: float
    sigterm: Any
    compiled: dict = dataclasses.field(default_factory=dict)
    predictors: dict = dataclasses.field(default_factory=dict)

    def predictor(self, graphdef, kind: str):
        key = (id(graphdef), kind)
        if key not in self.predictors:
            self.predictors[key] = (graphdef, make_predict(graphdef, kind))  # keeps graphdef alive: ids stay unique
        return self.predictors[key][1]


def resolve_tokenizer(c, workdir: epath.Path, source: EncoderSource, teacher: Teacher | None, texts):
    """(tokenizer, its path, save): explicit > 'train' > the init's own > the teacher's.

    A vocab newly trained on the task's texts lies in a temporary directory until `save()` (None when there is
    nothing to save) copies it to `workdir/tokenizer`: a run refused by a later check leaves no vocab behind."""
    if c.tokenizer == "train":
        path = workdir / "tokenizer"
        kw = dict(corpus_name=f"{c.task} train", vocab_size=c.tokenizer_vocab_size)
        if (path / VOCAB_FILE).exists():
            return trained_tokenizer(texts(), str(path), **kw), str(path), None
        tmp = epath.Path(tempfile.mkdtemp(prefix="mobiledistill-vocab-"))
        tok = trained_tokenizer(texts(), str(tmp), **kw)

        def save():
            path.mkdir(parents=True, exist_ok=True)
            for f in tmp.iterdir():  # the vocab and its settings, each through a temporary name
                part = path / f"{f.name}.tmp"
                part.write_text(f.read_text())
                part.replace(path / f.name)
            shutil.rmtree(tmp, ignore_errors=True)
        return tok, str(path), save
    path = c.tokenizer or source.tokenizer or (teacher.tokenizer if teacher else "")
    if not path:
        raise ConfigError(f"init={c.init!r} brings no tokenizer: set tokenizer=<vocab.txt|dir> or tokenizer=train")
    return load_tokenizer(path), str(path), None


def _recorded_label_names(workdir: epath.Path) -> tuple[str, ...] | None:
    """The label names a fine-tuning workdir (or `<workdir>/seed_<s>`) recorded in model.json, if any."""
    if workdir.name.startswith("seed_") and not (workdir / "model.json").exists():
        workdir = workdir.parent
    try:
        names = json.loads((workdir / "model.json").read_text()).get("label_names")
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return tuple(names) if names else None


def prepare(c, workdir: epath.Path, before_writing=None) -> Context:
    """Loads and checks data, teacher, encoder source and tokenizer; then calls `before_writing()` (the fingerprint
    check) and only after it writes to the workdir (a trained vocab, model.json)."""
    validate(c)
    kind = _kind(c.task)
    teacher_names = _recorded_label_names(epath.Path(c.distill.teacher[len("finetune:"):])) \
        if c.task == CUSTOM and c.distill.teacher.startswith("finetune:") else None
    known_names = (_recorded_label_names(workdir) if c.task == CUSTOM else None) or teacher_names
    examples, task = load_examples(c, known_names)
    if teacher_names is not None and task.label_names != teacher_names:
        raise ConfigError(f"distill.teacher {c.distill.teacher} was trained on the labels {list(teacher_names)}, "
                          f"this task has {list(task.label_names or [])}; the student must use the teacher's")
    num_labels = 2 if kind == "span" else task.num_labels
    teacher = load_teacher(c, kind, num_labels)
    ptp_teacher = load_teacher(c, kind, num_labels, c.ptp.teacher) if c.get("ptp") is not None else None
    source = encoder_source(c, c.model.dtype)
    tok, tok_path, save_tokenizer = resolve_tokenizer(c, workdir, source, teacher or ptp_teacher,
                                                      lambda: task_texts(task, examples["train"]))
    cfg = source.cfg
    if c.get("sps"):
        n = cfg.num_hidden_layers
        cfg = cfg.replace(layer_plan=paired_plan(n) if c.sps == "paired" else top_layers_plan(n, min(3, n)))
    if source.params is None:
        cfg = cfg.replace(vocab_size=tok.vocab_size)
    elif cfg.vocab_size != tok.vocab_size:
        raise ConfigError(f"tokenizer {tok_path} has {tok.vocab_size} tokens but the encoder of {c.init} has "
                          f"{cfg.vocab_size} embeddings; use the checkpoint's own vocab")
    if teacher is not None and teacher.cfg.vocab_size != tok.vocab_size:
        raise ConfigError(f"distill.teacher {c.distill.teacher} has a {teacher.cfg.vocab_size}-token vocab, the "
                          f"student's tokenizer {tok_path} {tok.vocab_size}: teacher and student must share one")
    if source.task is not None and source.task != (kind, num_labels):
        raise ConfigError(f"init={c.init}: a {source.task[0]} model with {source.task[1]} outputs, but task "
                          f"{c.task} needs a {kind} model with {num_labels}")
    if qat_enabled(c):
        check_qat_model(cfg)
    if c.data.max_seq_length > cfg.max_position_embeddings:
        raise ConfigError(f"data.max_seq_length={c.data.max_seq_length} exceeds the model's "
                          f"max_position_embeddings={cfg.max_position_embeddings}")
    data = build_features(c, examples, tok, task)
    mesh = sharding.make_mesh(-1, 1)
    if before_writing is not None:
        before_writing()
    if save_tokenizer is not None:
        save_tokenizer()
    if ptp_teacher is not None:
        data = _ptp_data(c, data, ptp_teacher, mesh)
        num_labels = data.num_labels
    spec, _ = loss_spec(c, kind, num_labels, teacher)
    if jax.process_index() == 0:
        info = {"task": c.task, "kind": kind, "num_labels": num_labels, "encoder": cfg.to_dict(),
                "tokenizer": tok_path, "seeds": [int(s) for s in c.seeds], "init": c.init,
                "teacher": c.distill.teacher, "label_names": list(data.label_names or []) or None}
        if qat_enabled(c):  # readers of the run rebuild its fake-quant model (mobiledistill.finetune.qat)
            info["qat"] = qat_settings(c)
        if task is not None and task.custom:
            info["custom"] = {"text_columns": list(task.text_keys), "label_column": task.label_key,
                              "regression": task.is_regression}
        tmp = workdir / "model.json.tmp"
        tmp.write_text(json.dumps(info, indent=2, default=str))
        tmp.replace(workdir / "model.json")
    from mobiledistill import perf
    peak, _ = perf.peak_flops_per_device()
    return Context(c, workdir, kind, cfg, source, data, teacher, spec, mesh, peak, None)


def _ptp_data(c, data: TaskData, t: Teacher, mesh) -> TaskData:
    """`data` with every split's labels replaced by the PTP labels of teacher `t` (4 classes)."""
    if data.num_labels < 2:
        raise ConfigError(f"ptp: task {c.task} is a regression task; PTP needs classification labels")
    predict = make_predict(t.graphdef, t.kind)

    def relabel(f):
        logits = predict_arrays(predict, t.params, f, c.train.eval_batch, mesh)["logits"]
        return {**f, "labels": ptp_labels(logits, f["labels"], float(c.ptp.t1), float(c.ptp.t2))}

    return dataclasses.replace(data, train=relabel(data.train), evals={s: relabel(f) for s, f in data.evals.items()},
                               num_labels=PTP_NUM_LABELS, label_names=None)
