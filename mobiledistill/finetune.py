"""Fine-tuning and task-specific distillation on GLUE / SQuAD (SPEC §4 "Fine-tuning", CKD task-specific).

`run(c, workdir)` builds the task model (SequenceClassificationModel or SpanModel) from `c.init`:

    hf:<dir>                    a transformers BERT/MobileBERT directory (encoder copied, head initialised)
    stage:<workdir>/<stage>     the encoder of a finished stage of a pre-training pipeline workdir
    preset:<name>               random initialisation (e.g. 'test_bert'; `c.model.*` fields override the preset)
    ptp:<workdir>[/seed_<s>]    the best-dev-loss encoder of a finished Pea-KD PTP run of this runner

Pea-KD hooks (configs/peakd.py; absent from plain configs): `c.sps` ('paired' or 'top3') runs the encoder with a
Shuffled Parameter Sharing plan; `c.ptp` ({teacher, t1, t2}) replaces the task labels of every split by the 4-way PTP
labels of that teacher's predictions, scores the dev split(s) by accuracy and loss, and keeps the encoder of the
best-dev-loss epoch in `seed_<s>/best_encoder.npz`.

and trains it with AdamW (weight decay 0.01, eps 1e-6, clip 1.0, 10% warm-up, linear decay) for `c.train.epochs`
epochs, evaluating on the dev split(s) after each epoch, once per seed in `c.seeds`. With `c.distill.teacher` set
(`hf:<dir>` of a fine-tuned transformers classifier, or `finetune:<workdir>[/seed_<s>]` of a finished run of this
runner) the loss is the teacher's logit KD at `temperature` (+ `ce_weight` x the task loss, + any registry terms in
`c.distill.extra_losses`, e.g. CKD relations or patience). KD-only teachers are run once over the training set and
their logits cached in the workdir (`teacher_logits.npz`).

Tasks with the user's own labels (`c.task='custom'`, `c.custom`): local TSV/CSV/JSONL files, any number of
classes named by the training file's label values (or `custom.labels`), one text column or a pair, or regression
(`custom.regression`); scored by accuracy and macro-F1 (Pearson/Spearman), predictions written as label names.

Every check (config, data, labels, teacher, init, tokenizer) runs before anything is written to the workdir, so a
refused command leaves it as it was and the corrected command starts cleanly.

Workdir layout:
    config.json, fingerprint        the experiment (re-running resumes; another config is refused)
    model.json                      task, encoder config, labels, tokenizer: makes the workdir a teacher source
    tokenizer/                      when `c.tokenizer='train'`
    seed_<s>/                       Orbax checkpoints (params, optimizer, data iterator), metrics.jsonl, eval.jsonl,
                                    tb/, done.json, <split>_predictions.tsv|json, <split>_metrics.json
    report.md, summary.json         mean ± std over seeds
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from ml_collections import config_dict

from mobiledistill import checkpoint as ckpt
from mobiledistill import convert, evaluate, sharding, steps, workdir_lock
from mobiledistill.config import MODEL_FIELDS, ConfigError
from mobiledistill.data import (
    CUSTOM,
    ArrayIterator,
    DataError,
    GlueTask,
    glue_features,
    glue_task,
    load_custom_files,
    load_glue_files,
    load_glue_tfds,
    load_squad_json,
    load_squad_tfds,
    load_tokenizer,
    rotten_tomatoes,
    squad_features,
    trained_tokenizer,
)
from mobiledistill.data.tokenizer import VOCAB_FILE
from mobiledistill.losses import distill
from mobiledistill.losses._util import field
from mobiledistill.losses.registry import LOSS_REGISTRY, make_loss, register_loss
from mobiledistill.metrics import StageMetrics
from mobiledistill.models import (
    EncoderConfig,
    PreTrainingModel,
    SequenceClassificationModel,
    SpanModel,
    forward_flops,
    preset,
)
from mobiledistill.optim import OptimizerConfig
from mobiledistill.strategies.peakd import PTP_NUM_LABELS, paired_plan, ptp_labels, top_layers_plan
from mobiledistill.strategies.stage import Stage
from mobiledistill.train import SigtermFlag, log_metrics, save_or_preempt

SQUAD = "squad"
# Teacher terms that need only the teacher's head outputs: their teacher can be run once and cached.
LOGIT_ONLY_TERMS = ("logit_kd", "kl_kd", "regression_kd", "span_kd")
# Keys that do not change what a seed computes (switching mode, adding seeds).
_FINGERPRINT_EXCLUDE = ("mode", "seeds", "train.log_every", "train.checkpoint_every")


# ---------------------------------------------------------------------------------------------------------------
# Config


def finetune_config() -> ml_collections.ConfigDict:
    """Defaults: GLUE SST-2 from TFDS, BERT recipe (lr 2e-5, batch 32, 3 epochs, seq 128), three seeds."""
    c = ml_collections.ConfigDict()
    c.kind = "finetune"
    c.mode = "train"  # 'train' (train, evaluate, report) or 'eval' (re-evaluate finished seeds, write predictions)
    c.task = "sst2"  # a GLUE task or 'squad'
    c.squad_version = "v1.1"  # with task='squad': 'v1.1' or 'v2.0'
    c.init = ""  # required: 'hf:<dir>', 'stage:<workdir>/<stage>', 'preset:<name>'
    # Encoder fields: with a preset they override it; with hf/stage inits only num_hidden_layers (keep the first n
    # layers), the dropout rates, classifier_pooling ('cls' | 'mean') and dtype may be set.
    c.model = ml_collections.ConfigDict({k: config_dict.placeholder(_field_type(k)) for k in MODEL_FIELDS})
    c.model.dtype = "float32"
    c.tokenizer = ""  # '' = the init's (or teacher's) own; a vocab.txt / tokenizer.json / directory; 'train'
    c.tokenizer_vocab_size = 8000  # with tokenizer='train': WordPiece trained on the task's training texts
    c.seeds = (0, 1, 2)

    c.data = ml_collections.ConfigDict()
    c.data.source = "tfds"  # 'tfds' (glue/<task>, squad/<version>), 'files', 'rotten_tomatoes' (task sst2)
    c.data.tfds_data_dir = ""
    c.data.files = ml_collections.ConfigDict(dict(train="", validation="", validation_matched="",
                                                  validation_mismatched="", test=""))
    c.data.eval_splits = ""  # comma-separated; '' = the task's dev split(s)
    c.data.max_seq_length = 128
    c.data.doc_stride = 128  # SQuAD
    c.data.max_query_length = 64  # SQuAD
    c.data.max_train_examples = 0  # 0 = all (the first n otherwise)
    c.data.max_eval_examples = 0
    c.data.split_seed = 0  # rotten_tomatoes: the by-movie split

    c.custom = ml_collections.ConfigDict()  # task='custom': your own labels, from data.files (TSV/CSV/JSONL)
    c.custom.labels = ()  # class names in id order ('neg,neu,pos'); () = the training file's distinct labels, sorted
    c.custom.text_columns = ()  # one column or a pair; () = the first of sentence1,sentence2 / text_a,text_b /
    #                             premise,hypothesis / question1,question2 / question,sentence / sentence / text
    c.custom.label_column = "label"
    c.custom.regression = False  # the label column is a number: Pearson/Spearman instead of accuracy/macro-F1

    c.train = ml_collections.ConfigDict()
    c.train.batch = 32
    c.train.epochs = 3
    c.train.lr = 2e-5
    c.train.weight_decay = 0.01
    c.train.eps = 1e-6
    c.train.clip_norm = 1.0
    c.train.warmup_fraction = 0.1
    c.train.dropout = True
    c.train.eval_batch = 64
    c.train.log_every = 50
    c.train.checkpoint_every = 500  # steps; every epoch end is checkpointed too
    c.train.keep_checkpoints = 2
    c.train.nonfinite = "stop"  # 'stop' or 'skip'

    c.distill = ml_collections.ConfigDict()
    c.distill.teacher = ""  # '' = plain fine-tuning; 'hf:<dir>' or 'finetune:<workdir>[/seed_<s>]'
    c.distill.temperature = 1.0
    c.distill.t_squared = False
    c.distill.kd_weight = 1.0
    c.distill.ce_weight = 0.0
    c.distill.extra_losses = ml_collections.ConfigDict()  # registry spec {term: {weight, [loss], **params}}
    c.distill.cache_teacher_logits = True
    return c


def _field_type(name: str):
    default = EncoderConfig.__dataclass_fields__[name].default
    return str if name == "attention_mask_value" else type(default)


ARG_KEYS = ("task", "init", "teacher", "tokenizer", "seeds", "epochs", "tiny")


def parse_arg(arg: str | None, allowed=ARG_KEYS) -> dict[str, str]:
    """'task=sst2,init=hf:/path,seeds=3' -> {'task': 'sst2', ...}; a bare word is taken as the task."""
    out: dict[str, str] = {}
    for part in (arg or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq:
            key, value = "task", part
        if key not in allowed:
            raise ConfigError(f"config argument {part!r}: unknown key {key!r}; valid: {', '.join(allowed)}")
        out[key] = value
    return out


def apply_arg(c: ml_collections.ConfigDict, args: Mapping[str, str]) -> None:
    """Applies the common `get_config(arg)` keys (see the config files' docstrings)."""
    if "task" in args:
        c.task = args["task"]
        if c.task == CUSTOM:
            c.data.source = "files"  # your own data comes from local files
    if "init" in args:
        c.init = args["init"]
    if "teacher" in args:
        c.distill.teacher = args["teacher"]
    if "tokenizer" in args:
        c.tokenizer = args["tokenizer"]
    if "seeds" in args:
        c.seeds = tuple(range(_int(args, "seeds")))
    if "epochs" in args:
        c.train.epochs = _int(args, "epochs")
    if args.get("tiny", "0") not in ("0", ""):
        tiny(c)


def _int(args, key) -> int:
    try:
        return int(args[key])
    except ValueError:
        raise ConfigError(f"config argument {key}={args[key]!r} is not an integer") from None


def tiny(c: ml_collections.ConfigDict) -> None:
    """Test size: `test_bert` preset, WordPiece trained on the task data, 8 training examples, batch 4 (2 steps),
    seq 32, one epoch, two seeds. Runs in seconds; the numbers mean nothing."""
    if not c.init:
        c.init = "preset:test_bert"
    if not c.tokenizer:
        c.tokenizer = "" if c.distill.teacher else "train"
    c.tokenizer_vocab_size = 300
    c.seeds = (0, 1)
    c.data.max_seq_length = 32
    c.data.doc_stride = 8
    c.data.max_query_length = 8
    c.data.max_train_examples = 8
    c.data.max_eval_examples = 8
    c.train.batch = 4
    c.train.eval_batch = 4
    c.train.epochs = 1
    c.train.lr = 1e-3
    c.train.log_every = 1


def validate(c) -> None:
    def bad(msg):
        raise ConfigError(msg)

    if c.get("kind") != "finetune":
        bad(f"kind={c.get('kind')!r}: not a fine-tuning config")
    if c.mode not in ("train", "eval"):
        bad(f"mode={c.mode!r}; valid: 'train', 'eval'")
    if c.task == CUSTOM:
        _validate_custom(c, bad)
    elif c.task != SQUAD:
        try:
            glue_task(c.task)
        except DataError:
            bad(f"task={c.task!r}; valid: {', '.join(evaluate.GLUE_TASKS)}, squad, custom")
    elif c.squad_version not in ("v1.1", "v2.0"):
        bad(f"squad_version={c.squad_version!r}; valid: 'v1.1', 'v2.0'")
    if not c.init.startswith(("hf:", "stage:", "preset:", "ptp:")):
        bad(f"init={c.init!r}; valid: 'hf:<dir>', 'stage:<workdir>/<stage>', 'preset:<name>', 'ptp:<workdir>'")
    if c.get("sps", "") not in ("", "paired", "top3"):
        bad(f"sps={c.sps!r}; valid: '', 'paired', 'top3'")
    if c.get("ptp") is not None and (c.task in (SQUAD, "stsb") or not c.ptp.teacher
                                     or (c.task == CUSTOM and c.custom.regression)):
        bad("ptp needs a classification task and ptp.teacher=finetune:<workdir> or hf:<dir>")
    if c.data.source not in ("tfds", "files", "rotten_tomatoes"):
        bad(f"data.source={c.data.source!r}; valid: 'tfds', 'files', 'rotten_tomatoes'")
    if c.data.source == "rotten_tomatoes" and c.task != "sst2":
        bad(f"data.source='rotten_tomatoes' gives SST-2-shaped sentences: use it with task=sst2, not {c.task!r}")
    if not list(c.seeds):
        bad("seeds is empty: give at least one seed, e.g. --config.seeds='(0,1,2)'")
    t = c.train
    for name in ("batch", "epochs", "eval_batch", "log_every", "checkpoint_every", "keep_checkpoints"):
        if t[name] < 1:
            bad(f"train.{name}={t[name]} must be >= 1")
    if not 0.0 <= t.warmup_fraction < 1.0:
        bad(f"train.warmup_fraction={t.warmup_fraction} must be in [0, 1)")
    if t.nonfinite not in ("stop", "skip"):
        bad(f"train.nonfinite={t.nonfinite!r}; valid: 'stop', 'skip'")
    n = jax.device_count()
    if t.batch % n or t.eval_batch % n:
        bad(f"train.batch={t.batch} and train.eval_batch={t.eval_batch} must be multiples of the {n} devices")
    teacher = c.distill.teacher
    if teacher and not teacher.startswith(("hf:", "finetune:")):
        bad(f"distill.teacher={teacher!r}; valid: '', 'hf:<dir>', 'finetune:<workdir>[/seed_<s>]'")
    for term, spec in c.distill.extra_losses.items():
        name = spec.get("loss", term)
        if name not in LOSS_REGISTRY:
            bad(f"distill.extra_losses.{term}: unknown loss {name!r}; registered: {sorted(LOSS_REGISTRY)}")


def _names(value) -> tuple[str, ...]:
    """A tuple config field given as a list, or on the command line as one comma-separated string."""
    if isinstance(value, str):
        value = (value,)
    value = tuple(str(v).strip() for v in value)
    if len(value) == 1:
        value = tuple(v.strip() for v in value[0].split(","))
    return tuple(v for v in value if v)


def _validate_custom(c, bad) -> None:
    u = c.get("custom")
    if u is None:
        bad("task='custom' needs the custom.* keys of finetune_config()")
    if c.data.source != "files":
        bad(f"task='custom' reads local files: data.source={c.data.source!r} must be 'files' (with "
            f"--config.data.files.train=... --config.data.files.validation=...)")
    if not u.label_column:
        bad("custom.label_column is empty; name the column that holds the labels")
    if not 0 <= len(_names(u.text_columns)) <= 2:
        bad(f"custom.text_columns={u.text_columns!r}: one column (single sentence) or two (sentence pairs)")
    labels = _names(u.labels)
    if u.regression and labels:
        bad(f"custom.regression=True with custom.labels={labels}: a regression task has no label names")
    if labels and len(set(labels)) != len(labels):
        bad(f"custom.labels={labels} names a label more than once")
    if labels and len(labels) < 2:
        bad(f"custom.labels={labels}: a classifier needs at least 2 labels")


# ---------------------------------------------------------------------------------------------------------------
# Span and cached-teacher loss terms (registered with the other terms)


@register_loss("span_ce")
def _span_ce():
    """SQuAD: mean of the start and end position cross-entropies."""
    def fn(t, s, b):
        w = b.get("example_weights")
        return 0.5 * (distill.cross_entropy(field(s, "start_logits"), b["start_positions"], w)
                      + distill.cross_entropy(field(s, "end_logits"), b["end_positions"], w))
    return fn


@register_loss("span_kd")
def _span_kd(temperature: float = 1.0, t_squared: bool = False):
    """SQuAD KD: mean of the start and end soft cross-entropies against the teacher at `temperature`."""
    def fn(t, s, b):
        w = b.get("example_weights")
        return 0.5 * sum(distill.soft_cross_entropy(field(s, k), field(t, k), temperature, t_squared=t_squared,
                                                    weights=w) for k in ("start_logits", "end_logits"))
    return fn


@register_loss("batch_teacher")
def _batch_teacher(inner: str, **params):
    """Runs term `inner` against teacher outputs carried in the batch as `teacher_<name>` (cached logits)."""
    fn = make_loss(inner, **params)

    def wrapped(t, s, b):
        return fn({k[len("teacher_"):]: v for k, v in b.items() if k.startswith("teacher_")}, s, b)
    return wrapped


# ---------------------------------------------------------------------------------------------------------------
# Task data


@dataclasses.dataclass
class TaskData:
    """Training features and, per dev split, the features to predict plus what scoring them needs."""

    train: dict[str, np.ndarray]
    evals: dict[str, Any]  # split -> GLUE feature dict or SquadFeatures
    train_texts: list[str]
    num_labels: int
    label_names: tuple[str, ...] | None
    task: GlueTask | None = None  # the GLUE or custom task (None: SQuAD)


def _eval_splits(c) -> list[str]:
    if c.data.eval_splits:
        return [s.strip() for s in c.data.eval_splits.split(",") if s.strip()]
    if c.task == SQUAD:
        return ["validation"]
    if c.task == CUSTOM:
        return ["validation"] + (["test"] if c.data.files.get("test") else [])
    return list(glue_task(c.task).eval_splits)


def _limit(examples: list, n: int) -> list:
    return examples[:n] if n and n > 0 else examples


def load_examples(c, label_names: tuple[str, ...] | None = None) -> tuple[dict[str, list], GlueTask | None]:
    """(raw examples of the training split and every eval split, the task: None for SQuAD).

    A custom task takes its label names from `custom.labels`, else `label_names` (a teacher's or an earlier run's),
    else the training file."""
    splits = ["train", *_eval_splits(c)]
    if c.task == CUSTOM:
        files = {}
        for s in splits:
            files[s] = c.data.files.get(s, "")
            if not files[s]:
                raise ConfigError(f"task='custom' needs data.files.{s} (a path or glob)")
        u = c.custom
        task, out = load_custom_files(files, text_columns=_names(u.text_columns),
                                      label_names=_names(u.labels) or label_names, regression=bool(u.regression),
                                      label_column=u.label_column)
        return {s: _limit(ex, c.data.max_train_examples if s == "train" else c.data.max_eval_examples)
                for s, ex in out.items()}, task
    out = {}
    if c.data.source == "rotten_tomatoes":
        parts = rotten_tomatoes(seed=c.data.split_seed)
        for s in splits:
            if s not in parts:
                raise ConfigError(f"rotten_tomatoes has splits {sorted(parts)}, not {s!r}")
            out[s] = parts[s]
    for s in splits:
        if s in out:
            continue
        if c.data.source == "files":
            path = c.data.files.get(s, "")
            if not path:
                raise ConfigError(f"data.source='files' needs data.files.{s} (a path or glob)")
            out[s] = load_squad_json(path) if c.task == SQUAD else load_glue_files(c.task, path)
        elif c.task == SQUAD:
            out[s] = load_squad_tfds(c.squad_version, s, data_dir=c.data.tfds_data_dir or None)
        else:
            out[s] = load_glue_tfds(c.task, s, data_dir=c.data.tfds_data_dir or None)
        out[s] = _limit(out[s], c.data.max_train_examples if s == "train" else c.data.max_eval_examples)
    if c.data.source == "rotten_tomatoes":
        for s in splits:
            out[s] = _limit(out[s], c.data.max_train_examples if s == "train" else c.data.max_eval_examples)
    return out, None if c.task == SQUAD else glue_task(c.task)


def task_texts(task: GlueTask | None, examples: list) -> list[str]:
    if task is None:
        return [t for ex in examples for t in (ex.question, ex.context)]
    return [ex[k] for ex in examples for k in task.text_keys]


def build_features(c, examples: Mapping[str, list], tok, task: GlueTask | None = None) -> TaskData:
    d = c.data
    if c.task == SQUAD:
        kw = dict(max_seq_length=d.max_seq_length, doc_stride=d.doc_stride, max_query_length=d.max_query_length)
        train = squad_features(examples["train"], tok, training=True, **kw).arrays
        evals = {s: squad_features(ex, tok, training=False, **kw) for s, ex in examples.items() if s != "train"}
        return TaskData(train, evals, [], 2, None)
    task = task or glue_task(c.task)

    def feats(ex):
        f = glue_features(task, ex, tok, d.max_seq_length)
        f["labels"] = f.pop("label")
        return f

    evals = {s: feats(ex) for s, ex in examples.items() if s != "train"}
    return TaskData(feats(examples["train"]), evals, [], task.num_labels, task.label_names, task)


# ---------------------------------------------------------------------------------------------------------------
# Models: sources, heads, teachers


def _kind(task: str) -> str:
    return "span" if task == SQUAD else "classification"


def new_task_model(kind: str, cfg: EncoderConfig, num_labels: int, seed) -> nnx.Module:
    """A randomly initialised task model; `seed` is an int or a key."""
    rngs = nnx.Rngs(seed)
    return SpanModel(cfg, rngs) if kind == "span" else SequenceClassificationModel(cfg, num_labels, rngs)


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


def _as_state(like: nnx.State, pure) -> nnx.State:
    if isinstance(pure, nnx.State):
        return pure
    state = jax.tree.map(lambda x: x, like)
    nnx.replace_by_pure_dict(state, pure)
    return state


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
    name = rest
    over = _model_overrides(c)
    over.pop("dtype", None)
    try:
        cfg = preset(name, **over, dtype=dtype)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return EncoderSource(cfg, None, "", f"preset {name} (random init)")


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
    model = nnx.eval_shape(lambda: new_task_model(info["kind"], cfg, info["num_labels"], 0))
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


# ---------------------------------------------------------------------------------------------------------------
# Losses


def loss_spec(c, kind: str, num_labels: int, teacher: Teacher | None) -> tuple[dict, bool]:
    """(registry spec, whether the teacher's logits can be cached instead of running it every step)."""
    regression = kind == "classification" and num_labels == 1
    task_term = "span_ce" if kind == "span" else ("regression" if regression else "task_ce")
    if teacher is None:
        return {task_term: {"weight": 1.0}}, False
    d = c.distill
    kd = "span_kd" if kind == "span" else ("regression_kd" if regression else "logit_kd")
    kd_params = {} if regression else {"temperature": float(d.temperature), "t_squared": bool(d.t_squared)}
    spec = {kd: {"weight": float(d.kd_weight), **kd_params}}
    if d.ce_weight:
        spec[task_term] = {"weight": float(d.ce_weight)}
    for term, extra in d.extra_losses.items():
        spec[term] = dict(extra.to_dict() if hasattr(extra, "to_dict") else extra)
    teacher_terms = [dict(v).get("loss", k) for k, v in spec.items() if k != task_term]
    cacheable = bool(d.cache_teacher_logits) and all(t in LOGIT_ONLY_TERMS for t in teacher_terms)
    if cacheable:
        spec = {k: (v if k == task_term else {"loss": "batch_teacher", "inner": v.get("loss", k),
                                               **{p: q for p, q in v.items() if p != "loss"}})
                for k, v in spec.items()}
    return spec, cacheable


# ---------------------------------------------------------------------------------------------------------------
# Prediction and metrics


def _output_keys(kind: str) -> tuple[str, ...]:
    return ("start_logits", "end_logits") if kind == "span" else ("logits",)


def make_predict(graphdef, kind: str):
    keys = _output_keys(kind)

    def predict(params, batch):
        out = steps.forward(nnx.merge(graphdef, params), batch)
        return {k: out[k] for k in keys}

    return jax.jit(predict)


def predict_arrays(predict, params, arrays: Mapping[str, np.ndarray], batch: int, mesh) -> dict[str, np.ndarray]:
    """Head outputs for every row of `arrays`, in order (every host computes all rows)."""
    inputs = {k: arrays[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    it = ArrayIterator(inputs, batch, shuffle=False, drop_remainder=False, num_epochs=1, process_index=0,
                       process_count=1)
    rep = sharding.replicated(mesh)
    chunks: dict[str, list] = {}
    for b in it:
        keep = b.pop("example_mask") > 0
        out = jax.device_get(predict(params, jax.device_put(b, rep)))
        for k, v in out.items():
            chunks.setdefault(k, []).append(np.asarray(v)[keep])
    return {k: np.concatenate(v) for k, v in chunks.items()}


def score(c, kind: str, features, outputs: Mapping[str, np.ndarray], task: GlueTask | None = None
          ) -> tuple[dict, Any, dict]:
    """(metrics in percent, predictions to write, extra write_eval_outputs arguments)."""
    if kind == "span":
        v2 = c.squad_version == "v2.0"
        spans = evaluate.decode_spans(features.eval_columns(), outputs["start_logits"], outputs["end_logits"],
                                      version_2=v2, contexts=features.contexts)
        golds = [ex.gold() for ex in features.examples]
        metrics = evaluate.squad_metrics(spans.predictions, golds, spans.null_odds if v2 else None, version_2=v2)
        metrics["score"] = metrics["f1"]
        extra = dict(nbest=spans.nbest, null_odds=spans.null_odds if v2 else None)
        return metrics, spans.predictions, extra
    logits = outputs["logits"]
    if c.get("ptp") is not None:
        labels = features["labels"]
        logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), -1)
        loss = float(-jnp.mean(jnp.take_along_axis(logp, jnp.asarray(labels)[:, None], -1)))
        acc = 100.0 * float(np.mean(np.argmax(logits, -1) == labels))
        return {"accuracy": acc, "loss": loss, "score": acc}, np.argmax(logits, -1), {}
    task = task or glue_task(c.task)
    preds = logits[:, 0] if task.is_regression else np.argmax(logits, -1)
    if task.custom:
        metrics = evaluate.custom_metrics(logits, features["labels"], task.label_names)
    else:
        metrics = evaluate.glue_metrics(task.name, logits, features["labels"])
    return metrics, preds, dict(label_names=task.label_names)


def _flat_metrics(per_split: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """One split's metrics as they are; several splits as `<split>/<metric>`, each split on its own (never
    averaged: a dev and a test number mean different things)."""
    if len(per_split) == 1:
        return dict(next(iter(per_split.values())))
    return {f"{s}/{k}": v for s, m in per_split.items() for k, v in m.items()}


# ---------------------------------------------------------------------------------------------------------------
# The runner


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


def _keep_best_encoder(ctx: Context, run_dir: epath.Path, params, metrics: Mapping[str, Mapping[str, float]],
                       epoch: int) -> None:
    """PTP: writes the encoder to best_encoder.npz when the mean dev loss is the lowest so far."""
    loss = float(np.mean([m["loss"] for m in metrics.values()]))
    info = run_dir / "best_encoder.json"
    if info.exists():
        try:
            best = float(json.loads(info.read_text())["loss"])
        except (ValueError, KeyError, TypeError) as e:
            ckpt.warn(f"{info} cannot be read ({type(e).__name__}): keeping this epoch's encoder as the best")
            best = float("inf")
        if best <= loss:
            return
    if jax.process_index() == 0:
        flat = {"/".join(map(str, p)): np.asarray(jax.device_get(v.get_value() if hasattr(v, "get_value") else v))
                for p, v in nnx.to_flat_state(params["encoder"])}
        tmp = run_dir / "best_encoder.tmp.npz"
        with tmp.open("wb") as f:
            np.savez(f, **flat)
        tmp.replace(run_dir / "best_encoder.npz")
        ckpt.write_json_atomic(info, {"loss": loss, "epoch": epoch})


def initial_params(ctx: Context, seed: int) -> tuple[Any, nnx.State]:
    """(graphdef, parameters): a random task model (one compiled init for all seeds), encoder copied in."""
    if "init" not in ctx.compiled:
        make = lambda key: new_task_model(ctx.kind, ctx.cfg, ctx.data.num_labels, key)
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: make(jax.random.key(0))))
        ctx.compiled["init"] = (graphdef, jax.jit(lambda key: nnx.split(make(key))[1]))
    graphdef, init = ctx.compiled["init"]
    params = init(jax.random.key(seed))
    if ctx.source.params is not None:
        enc = params["encoder"]
        copy_matching(enc, ctx.source.params, ctx.source.description)
        params["encoder"] = enc
    return graphdef, params


def teacher_outputs(ctx: Context) -> dict[str, np.ndarray]:
    """The teacher's head outputs over the training features (no dropout), cached in the workdir."""
    t = ctx.teacher
    path = ctx.workdir / "teacher_logits.npz"
    key = f"{ctx.c.distill.teacher}|{len(ctx.data.train['input_ids'])}|{ctx.c.data.max_seq_length}"
    if path.exists():
        try:
            cached = ckpt.read_npz(path, "teacher-logit cache")
        except ckpt.CheckpointError as e:  # a cache: recompute it
            ckpt.warn(f"{e}: computing the teacher's logits again")
            cached = {}
        if str(cached.pop("key", "")) == key:
            return cached
    print(f"teacher ({t.description}): computing logits of {len(ctx.data.train['input_ids'])} training "
          f"examples", flush=True)
    out = predict_arrays(ctx.predictor(t.graphdef, t.kind), t.params, ctx.data.train, ctx.c.train.eval_batch,
                         ctx.mesh)
    if jax.process_index() == 0:
        tmp = ctx.workdir / "teacher_logits.tmp.npz"
        with tmp.open("wb") as f:
            np.savez(f, key=np.array(key), **out)
        tmp.replace(path)
    return out


def evaluate_params(ctx: Context, graphdef, params) -> tuple[dict, dict]:
    """({split: metrics}, {split: (predictions, extra)}) on every eval split."""
    predict = ctx.predictor(graphdef, ctx.kind)
    metrics, written = {}, {}
    for split, features in ctx.data.evals.items():
        arrays = features.arrays if ctx.kind == "span" else features
        outputs = predict_arrays(predict, params, arrays, ctx.c.train.eval_batch, ctx.mesh)
        m, preds, extra = score(ctx.c, ctx.kind, features, outputs, ctx.data.task)
        metrics[split], written[split] = m, (preds, extra)
    return metrics, written


def write_outputs(run_dir: epath.Path, metrics: dict, written: dict, prefix: str = "") -> None:
    if jax.process_index() != 0:
        return
    for split, (preds, extra) in written.items():
        evaluate.write_eval_outputs(str(run_dir), preds, metrics[split], name=prefix + split, overwrite=True,
                                    **{k: v for k, v in extra.items() if v is not None})


def _eval_line(metrics: Mapping[str, Mapping[str, float]]) -> str:
    return "; ".join(f"{s}: " + ", ".join(f"{k} {v:.2f}" for k, v in m.items() if isinstance(v, float)
                                          and not k.endswith("thresh"))
                     for s, m in metrics.items())


def train_seed(ctx: Context, seed: int, index: int) -> dict:
    c = ctx.c
    run_dir = ctx.workdir / f"seed_{seed}"
    label = f"[seed {seed} ({index + 1}/{len(c.seeds)})]"
    done = ckpt.stage_done(run_dir)
    if done is not None:
        print(f"{label} finished earlier: skipped", flush=True)
        return done
    run_dir.mkdir(parents=True, exist_ok=True)
    train_arrays = dict(ctx.data.train)
    teacher = ctx.teacher
    _, cacheable = loss_spec(c, ctx.kind, ctx.data.num_labels, teacher)
    if teacher is not None and cacheable:
        train_arrays.update({f"teacher_{k}": v for k, v in teacher_outputs(ctx).items()})
    use_teacher_forward = teacher is not None and not cacheable

    data = ArrayIterator(train_arrays, c.train.batch, shuffle=True, drop_remainder=True, seed=seed,
                         sharding=sharding.batch_sharding(ctx.mesh))
    per_epoch = data.steps_per_epoch
    total = per_epoch * c.train.epochs
    optimizer = OptimizerConfig(name="adamw", learning_rate=c.train.lr, schedule="warmup_linear",
                                warmup_fraction=c.train.warmup_fraction, total_steps=total,
                                weight_decay=c.train.weight_decay, eps=c.train.eps,
                                clip_norm=c.train.clip_norm or None, skip_nonfinite=c.train.nonfinite == "skip")
    stage = Stage(name=f"seed_{seed}", steps=total, losses=ctx.spec, optimizer=optimizer, init="fresh",
                  teacher_from=c.distill.teacher or None, dropout=bool(c.train.dropout))

    graphdef, init = initial_params(ctx, seed)
    p_shard = sharding.tree_shardings(init, ctx.mesh)
    params = jax.device_put(init, p_shard)
    if total not in ctx.compiled:  # seeds share one jitted step (it depends on the step count, not the seed)
        tx, step_fn = steps.make_train_step(stage, graphdef, params,
                                            teacher.graphdef if use_teacher_forward else None)
        o_shard = sharding.tree_shardings(jax.eval_shape(tx.init, params), ctx.mesh)
        ctx.compiled[total] = (tx, o_shard, jax.jit(tx.init, out_shardings=o_shard), jax.jit(
            step_fn, out_shardings=(p_shard, o_shard, sharding.replicated(ctx.mesh)), donate_argnums=(0, 1)))
    tx, o_shard, init_opt, jit_step = ctx.compiled[total]
    opt_state = init_opt(params)
    t_params = teacher.params if use_teacher_forward else None

    checkpoints = ckpt.StageCheckpoints(run_dir, max_to_keep=c.train.keep_checkpoints)
    latest = checkpoints.restore_latest(params, opt_state)  # the newest readable checkpoint, if any
    start = 0
    if latest is not None:
        start, restored, opt_state, data_state = latest
        params = _as_state(init, restored)
        data.set_state(data_state)
    seq = c.data.max_seq_length
    flops = 3 * forward_flops(ctx.cfg, seq) * c.train.batch / jax.device_count()
    t_flops = (forward_flops(teacher.cfg, seq) * c.train.batch / jax.device_count()) if use_teacher_forward else 0
    log = StageMetrics(run_dir, stage.name, total, start, label, c.train.batch * seq, (flops, t_flops), ctx.peak)
    log.event(f"{'resuming at step ' + str(start) if start else 'starting'}: {total} steps ({c.train.epochs} epochs "
              f"of {per_epoch}), {ctx.source.description}, losses {sorted(ctx.spec)}")
    key = jax.random.key(seed)
    eval_log = run_dir / "eval.jsonl"
    t0 = time.perf_counter()
    last_good = start
    try:
        for step in range(start, total):
            params, opt_state, metrics = jit_step(params, opt_state, t_params, next(data),
                                                  jax.random.fold_in(key, step))
            done_steps = step + 1
            epoch_end = done_steps % per_epoch == 0
            is_ckpt = (epoch_end or done_steps % c.train.checkpoint_every == 0) and done_steps < total
            if done_steps % c.train.log_every == 0 or epoch_end or ctx.sigterm.raised:
                log_metrics(log, done_steps, metrics, c.train.nonfinite, f"seed {seed}", last_good, "lower train.lr")
            if epoch_end and done_steps < total:
                ev, _ = evaluate_params(ctx, graphdef, params)
                log.event(f"epoch {done_steps // per_epoch}: {_eval_line(ev)}")
                if c.get("ptp") is not None:
                    _keep_best_encoder(ctx, run_dir, params, ev, done_steps // per_epoch)
                _append_jsonl(eval_log, {"step": done_steps, "epoch": done_steps // per_epoch,
                                         **_flat_metrics(ev)})
            if save_or_preempt(checkpoints, done_steps, params, opt_state, data, is_ckpt, ctx.sigterm, f"seed {seed}"):
                last_good = done_steps
        if checkpoints.latest_step() != total:
            checkpoints.save(total, params, opt_state, data.get_state())
        checkpoints.wait()
        ev, written = evaluate_params(ctx, graphdef, params)
        write_outputs(run_dir, ev, written)
        if c.get("ptp") is not None:
            _keep_best_encoder(ctx, run_dir, params, ev, c.train.epochs)
        flat = _flat_metrics(ev)
        _append_jsonl(eval_log, {"step": total, "epoch": c.train.epochs, **flat})
        log.event(f"final (epoch {c.train.epochs}): {_eval_line(ev)}")
        summary = {"seed": int(seed), "final_step": total, "seconds": time.perf_counter() - t0, **flat}
        checkpoints.mark_done(summary)
        return summary
    finally:
        checkpoints.close()
        log.close()


def _append_jsonl(path: epath.Path, record: dict) -> None:
    if jax.process_index() == 0:
        with path.open("a") as f:
            f.write(json.dumps(evaluate._jsonable(record)) + "\n")


def run_label(c) -> str:
    base = c.init.split(":", 1)[0]
    name = f"{c.task}{'/' + c.squad_version if c.task == SQUAD else ''} {base} init"
    return name + (f", distilled from {c.distill.teacher}" if c.distill.teacher else "")


def _split_runs(runs: list[dict], split: str, n_splits: int) -> list[dict]:
    """Each seed's metrics of one eval split, with the `<split>/` prefix of multi-split runs removed."""
    if n_splits == 1:
        return runs
    pre = split + "/"
    return [{"seed": r["seed"], **{k[len(pre):]: v for k, v in r.items() if k.startswith(pre)}} for r in runs]


def _label_f1_table(runs: list[dict], label_names: tuple[str, ...], labels: np.ndarray) -> str:
    """Markdown: per label, its rows in the split and its F1 (mean ± std over the seeds that define it)."""
    counts = np.bincount(np.asarray(labels, np.int64), minlength=len(label_names))
    lines = ["| label | rows | F1 |", "|---|---:|---:|"]
    for i, name in enumerate(label_names):
        vals = [r["f1_per_label"].get(name) for r in runs if isinstance(r.get("f1_per_label"), Mapping)]
        vals = [v for v in vals if v is not None]
        cell = "–" if not vals else (f"{vals[0]:.2f}" if len(vals) == 1 else
                                     f"{np.mean(vals):.2f} ± {np.std(vals, ddof=1):.2f}")
        shown = str(name).replace("|", "\\|")
        lines.append(f"| {shown} | {int(counts[i])} | {cell} |")
    return "\n".join(lines) + "\n"


def write_report(c, workdir: epath.Path, ctx: Context, summaries: Mapping[int, dict]) -> str:
    runs = [summaries[s] for s in c.seeds if s in summaries]
    splits = list(ctx.data.evals)
    sections = []
    for split in splits:
        split_runs = _split_runs(runs, split, len(splits))
        names = [k for k in split_runs[0] if k not in ("seed", "final_step", "seconds") and "thresh" not in k
                 and isinstance(split_runs[0][k], (int, float))]
        table = evaluate.format_seed_table({run_label(c): split_runs}, names)
        per_seed = evaluate.format_seed_table([(f"seed {r['seed']}", [r]) for r in split_runs], names,
                                              label="seed")
        section = f"## {split}\n\n{table}\nPer seed:\n\n{per_seed}"
        if ctx.data.label_names and any("f1_per_label" in r for r in split_runs):
            section += (f"\nPer label ({split}):\n\n"
                        f"{_label_f1_table(split_runs, ctx.data.label_names, ctx.data.evals[split]['labels'])}")
        sections.append(section)
    task = ctx.data.task
    if ctx.data.label_names:
        labels = f"labels (class id order): {', '.join(map(str, ctx.data.label_names))}. "
    elif task is not None and task.is_regression:
        labels = f"regression target{f' `{task.label_key}`' if task.custom else ''}. "
    else:
        labels = ""
    from mobiledistill.models import count_params
    n_params = count_params(nnx.state(nnx.eval_shape(lambda: new_task_model(ctx.kind, ctx.cfg,
                                                                                ctx.data.num_labels, 0))))
    teacher = f"teacher `{c.distill.teacher}`, losses {', '.join(ctx.spec)}, " if c.distill.teacher else ""
    text = (f"# mobiledistill fine-tuning report: {c.task}\n\n"
            f"init `{c.init}` ({ctx.source.description}), {n_params:,} parameters, "
            f"{teacher}"
            f"data `{c.data.source}` ({len(ctx.data.train['input_ids'])} training rows, eval on "
            f"{', '.join(ctx.data.evals)}), {c.train.epochs} epochs, batch {c.train.batch} x seq "
            f"{c.data.max_seq_length}, AdamW lr {c.train.lr:g}. {labels}Metrics in percent, each eval split on its "
            f"own; mean ± sample std over seeds.\n\n" + "\n".join(sections))
    if jax.process_index() == 0:
        ckpt.write_text_atomic(workdir / "report.md", text)
        agg = evaluate.summarize_seeds(runs)
        ckpt.write_text_atomic(workdir / "summary.json", json.dumps(evaluate._jsonable(
            {"label": run_label(c), "seeds": runs, "mean_std": agg}), indent=2))
    return text


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
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: new_task_model(ctx.kind, ctx.cfg,
                                                                             ctx.data.num_labels, 0)))
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
COPY_SETTABLE = _COPY_SETTABLE
model_overrides = _model_overrides
truncated = _truncated


def label_names_of(c) -> tuple[str, ...]:
    """The class names a custom task's config gives (`custom.labels`); () = named by the training file."""
    return _names(c.custom.labels)
