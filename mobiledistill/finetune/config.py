"""The fine-tuning config: defaults, the `get_config(arg)` keys of the config files, the test size, validation."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import ml_collections
from ml_collections import config_dict

from mobiledistill import evaluate
from mobiledistill.config import MODEL_FIELDS, ConfigError, model_field_type
from mobiledistill.data import CUSTOM, DataError, glue_task
from mobiledistill.losses.registry import LOSS_REGISTRY

SQUAD = "squad"


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
    c.model = ml_collections.ConfigDict({k: config_dict.placeholder(model_field_type(k)) for k in MODEL_FIELDS})
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
    if not c.init.startswith(("hf:", "stage:", "preset:", "ptp:", "finetune:")):
        bad(f"init={c.init!r}; valid: 'hf:<dir>', 'stage:<workdir>/<stage>', 'preset:<name>', 'ptp:<workdir>', "
            f"'finetune:<workdir>[/seed_<s>]'")
    if c.get("qat") is not None:
        from mobiledistill.finetune.qat import check
        check(c)
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


def label_names_of(c) -> tuple[str, ...]:
    """The class names a custom task's config gives (`custom.labels`); () = named by the training file."""
    return _names(c.custom.labels)
