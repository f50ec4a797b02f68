"""Hugging Face <-> mobiledistill parameters, both directions, through safetensors (never pickle).

Covers `BertModel`, `BertForPreTraining`, `MobileBertModel` and `MobileBertForPreTraining`, and the task models
`*ForSequenceClassification` (classification and regression) and `*ForQuestionAnswering` (SQuAD spans), state dicts
and their config.json. PyTorch Linear weights are [out, in]; Flax kernels are their transpose. An SPS (Pea-KD shared
layer) encoder is written unrolled: one transformers layer per executed plan entry, Q and K exchanged where the plan
swaps them, so transformers computes the same function with unshared layers.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Iterator

import numpy as np
from flax import nnx

from mobiledistill.models.config import EncoderConfig
from mobiledistill.models.encoder import Encoder
from mobiledistill.models.heads import PreTrainingModel, SequenceClassificationModel, SpanModel

# (our path, HF name, kind); kind: "linear" (kernel+bias), "linear_nobias", "embed", "norm", "param", "param_t".
Entry = tuple[tuple, str, str]


class ConversionError(ValueError):
    """A checkpoint does not fit the model: names the missing, unexpected or mis-shaped tensors."""


def _norm_dense(ours: tuple, hf: str) -> list[Entry]:
    return [(ours + ("dense",), hf + ".dense", "linear"), (ours + ("norm",), hf + ".LayerNorm", "norm")]


def _layer_entries(cfg: EncoderConfig, i: int, hf: str, swap_qk: bool = False) -> list[Entry]:
    o = ("layers", i)
    e: list[Entry] = []
    if cfg.use_bottleneck:
        e += _norm_dense(o + ("bottleneck_input",), f"{hf}.bottleneck.input")
    if cfg.key_query_shared_bottleneck:
        e += _norm_dense(o + ("bottleneck_attention",), f"{hf}.bottleneck.attention")
    for name, hf_name in (("query", "key" if swap_qk else "query"), ("key", "query" if swap_qk else "key"),
                          ("value", "value")):
        e.append((o + (name,), f"{hf}.attention.self.{hf_name}", "linear"))
    e += _norm_dense(o + ("attention_output",), f"{hf}.attention.output")
    for j in range(cfg.num_feedforward_networks - 1):
        e.append((o + ("ffn", j, "intermediate"), f"{hf}.ffn.{j}.intermediate.dense", "linear"))
        e += _norm_dense(o + ("ffn", j, "output"), f"{hf}.ffn.{j}.output")
    e.append((o + ("intermediate",), f"{hf}.intermediate.dense", "linear"))
    e += _norm_dense(o + ("output",), f"{hf}.output")
    if cfg.use_bottleneck:
        e += _norm_dense(o + ("output_bottleneck",), f"{hf}.output.bottleneck")
    return e


def hf_arch(cfg: EncoderConfig) -> str:
    """'bert' for plain BERT layouts, 'mobilebert' otherwise (bottlenecks, trigram, NoNorm, stacked FFNs)."""
    plain = (not cfg.use_bottleneck and not cfg.trigram_input and cfg.embedding_size == cfg.hidden_size
             and cfg.num_feedforward_networks == 1 and cfg.normalization_type == "layer_norm")
    return "bert" if plain else "mobilebert"


def encoder_entries(cfg: EncoderConfig, prefix: str) -> list[Entry]:
    """Name table of the backbone. `prefix` is e.g. 'mobilebert.' / 'bert.' / '' (bare BertModel files)."""
    e: list[Entry] = [
        (("embeddings", "word_embeddings"), f"{prefix}embeddings.word_embeddings", "embed"),
        (("embeddings", "position_embeddings"), f"{prefix}embeddings.position_embeddings", "embed"),
        (("embeddings", "token_type_embeddings"), f"{prefix}embeddings.token_type_embeddings", "embed"),
        (("embeddings", "norm"), f"{prefix}embeddings.LayerNorm", "norm"),
    ]
    if cfg.has_embedding_transformation:
        e.append((("embeddings", "embedding_transformation"), f"{prefix}embeddings.embedding_transformation",
                  "linear"))
    for n, (i, swap_qk) in enumerate(cfg.plan):  # an SPS plan reuses layer i: the same tensors under several names
        e += _layer_entries(cfg, i, f"{prefix}encoder.layer.{n}", swap_qk)
    if cfg.classifier_activation:
        e.append((("pooler",), f"{prefix}pooler.dense", "linear"))
    return e


def pretraining_entries(cfg: EncoderConfig) -> list[Entry]:
    prefix = hf_arch(cfg) + "."
    e = [(("encoder",) + p, n, k) for p, n, k in encoder_entries(cfg, prefix)]
    e += [
        (("mlm", "transform"), "cls.predictions.transform.dense", "linear"),
        (("mlm", "transform_norm"), "cls.predictions.transform.LayerNorm", "norm"),
        (("mlm", "bias"), "cls.predictions.bias", "param"),
        (("nsp",), "cls.seq_relationship", "linear"),
    ]
    if cfg.hidden_size != cfg.embedding_size:
        e.append((("mlm", "extra_output_weights"), "cls.predictions.dense.weight", "param_t"))
    return e


def task_entries(model: nnx.Module) -> list[Entry]:
    """Name table of a task model: the backbone under 'bert.'/'mobilebert.' plus its head."""
    cfg = model.encoder.cfg
    e = [(("encoder",) + p, n, k) for p, n, k in encoder_entries(cfg, hf_arch(cfg) + ".")]
    head = "qa_outputs" if isinstance(model, SpanModel) else "classifier"
    return e + [((head,), head, "linear")]


_TASK_MODELS = (SequenceClassificationModel, SpanModel)


def _cfg_of(model: nnx.Module) -> EncoderConfig:
    return model.cfg if isinstance(model, Encoder) else model.encoder.cfg


def _expand(entries: list[Entry]) -> Iterator[tuple[tuple, str, bool]]:
    """Leaf-level (our path, HF tensor name, transpose?) triples."""
    for ours, hf, kind in entries:
        if kind == "linear":
            yield ours + ("kernel",), hf + ".weight", True
            yield ours + ("bias",), hf + ".bias", False
        elif kind == "embed":
            yield ours + ("embedding",), hf + ".weight", False
        elif kind == "norm":
            yield ours + ("scale",), hf + ".weight", False
            yield ours + ("bias",), hf + ".bias", False
        elif kind == "param":
            yield ours, hf, False
        elif kind == "param_t":
            yield ours, hf, True


def _entries_for(model: nnx.Module, cfg: EncoderConfig, prefix: str | None) -> list[Entry]:
    if isinstance(model, PreTrainingModel):
        return pretraining_entries(cfg)
    if isinstance(model, _TASK_MODELS):
        return task_entries(model)
    if isinstance(model, Encoder):
        return encoder_entries(cfg, hf_arch(cfg) + "." if prefix is None else prefix)
    raise TypeError(f"conversion supports Encoder, PreTrainingModel, SequenceClassificationModel and SpanModel, "
                    f"not {type(model).__name__}")


def to_hf_state_dict(model: nnx.Module, prefix: str | None = None) -> dict[str, np.ndarray]:
    """Our parameters as a transformers state dict (float32 numpy); tied decoder weights are included."""
    cfg = _cfg_of(model)
    flat = {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    sd = {hf: (flat[ours].T if t else flat[ours]) for ours, hf, t in _expand(_entries_for(model, cfg, prefix))}
    if isinstance(model, PreTrainingModel):
        sd["cls.predictions.decoder.weight"] = sd[hf_arch(cfg) + ".embeddings.word_embeddings.weight"]
        sd["cls.predictions.decoder.bias"] = sd["cls.predictions.bias"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}


# Head tensors a bare Encoder leaves alone (pre-training heads, classifier, span head).
_HEAD_PREFIXES = ("cls.", "classifier.", "qa_outputs.")
_TIED_OR_BUFFERS = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "position_ids")


def _detect_prefix(state_dict: dict, cfg: EncoderConfig) -> str:
    for candidate in (hf_arch(cfg) + ".", "bert.", "mobilebert.", ""):
        if candidate + "embeddings.word_embeddings.weight" in state_dict:
            return candidate
    raise ConversionError("checkpoint has no '*embeddings.word_embeddings.weight' tensor: not a BERT/MobileBERT "
                          "state dict")


def load_hf_state_dict(model: nnx.Module, state_dict: dict[str, np.ndarray], strict: bool = True) -> None:
    """Writes a transformers state dict into `model` in place.

    Old TF-style names (`gamma`/`beta`) are accepted. With `strict`, tensors that the model does not use (other than
    tied copies and buffers) are an error; missing and mis-shaped tensors always are.
    """
    cfg = _cfg_of(model)
    sd = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
          for k, v in state_dict.items()}
    prefix = _detect_prefix(sd, cfg) if isinstance(model, Encoder) else None
    state = nnx.state(model, nnx.Param)
    flat = {tuple(p): v for p, v in nnx.to_flat_state(state)}
    missing, shapes, used = [], [], set()
    for ours, hf, transpose in _expand(_entries_for(model, cfg, prefix)):
        if hf not in sd:
            missing.append(hf)
            continue
        used.add(hf)
        value = np.asarray(sd[hf], dtype=np.float32)
        value = value.T if transpose else value
        target = flat[ours]
        if value.shape != tuple(target.shape):
            shapes.append(f"{hf} {tuple(np.shape(sd[hf]))} (model expects "
                          f"{tuple(reversed(target.shape)) if transpose else tuple(target.shape)})")
            continue
        target.set_value(value)
    unexpected = sorted(k for k in sd if k not in used and not any(k.endswith(t) for t in _TIED_OR_BUFFERS)
                        and not (isinstance(model, Encoder) and k.startswith(_HEAD_PREFIXES)))
    problems = []
    if missing:
        problems.append(f"missing {missing}")
    if shapes:
        problems.append(f"mis-shaped {shapes}")
    if unexpected and strict:
        problems.append(f"unexpected {unexpected}")
    if problems:
        raise ConversionError("checkpoint does not fit the model: " + "; ".join(problems))
    nnx.update(model, state)


def config_to_hf(cfg: EncoderConfig) -> dict:
    """A transformers config.json dict (BertConfig or MobileBertConfig); an SPS plan counts as unrolled layers."""
    common = {k: getattr(cfg, k) for k in (
        "vocab_size", "hidden_size", "num_attention_heads", "intermediate_size", "hidden_act",
        "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
        "initializer_range", "layer_norm_eps", "pad_token_id")}
    common["num_hidden_layers"] = len(cfg.plan)
    if hf_arch(cfg) == "bert":
        return {"model_type": "bert", "architectures": ["BertForPreTraining"], **common}
    mobile = {k: getattr(cfg, k) for k in (
        "embedding_size", "trigram_input", "use_bottleneck", "intra_bottleneck_size", "use_bottleneck_attention",
        "key_query_shared_bottleneck", "num_feedforward_networks", "normalization_type", "classifier_activation")}
    return {"model_type": "mobilebert", "architectures": ["MobileBertForPreTraining"], **common, **mobile}


def check_hf_expressible(cfg: EncoderConfig, uses_pooler: bool = True) -> None:
    """Raises ConversionError for configs that transformers cannot build or would silently compute differently."""
    if cfg.attention_mask_value != "min":
        raise ConversionError(f"attention_mask_value={cfg.attention_mask_value!r}: transformers masks with finfo.min, "
                              f"so the saved model would differ on padded inputs; only 'min' converts exactly")
    if (cfg.use_bottleneck and not cfg.key_query_shared_bottleneck and not cfg.use_bottleneck_attention
            and cfg.intra_bottleneck_size != cfg.hidden_size):
        raise ConversionError(f"IB-BERT layout (Q, K, V from the {cfg.hidden_size}-wide block input, intra size "
                              f"{cfg.intra_bottleneck_size}): transformers' MobileBERT cannot build it (its query/key "
                              f"take the intra size)")
    if hf_arch(cfg) == "mobilebert" and cfg.normalization_type == "layer_norm" and not cfg.hf_eps_quirk:
        raise ConversionError("hf_eps_quirk=False with layer_norm: transformers' MobileBERT uses eps 1e-5 in two "
                              "LayerNorms, so the saved model would differ; set hf_eps_quirk=True")
    if uses_pooler and cfg.classifier_pooling != "cls":
        raise ConversionError(f"classifier_pooling={cfg.classifier_pooling!r}: transformers' sequence classification "
                              f"models read the [CLS] token; only 'cls' converts (the encoder alone does)")
    if uses_pooler and hf_arch(cfg) == "bert" and not cfg.classifier_activation:
        raise ConversionError("classifier_activation=False on a plain BERT layout: transformers' BERT always has a "
                              "tanh pooler")


def task_config(model: nnx.Module, label_names=None) -> dict:
    """config.json fields of a task model: architectures, num_labels, id2label/label2id, problem_type."""
    arch = "Bert" if hf_arch(model.encoder.cfg) == "bert" else "MobileBert"
    if isinstance(model, SpanModel):
        return {"architectures": [f"{arch}ForQuestionAnswering"], "num_labels": 2}
    n = model.num_labels
    names = list(label_names) if label_names is not None else (
        ["score"] if n == 1 else [f"LABEL_{i}" for i in range(n)])
    if len(names) != n:
        raise ConversionError(f"{len(names)} label names {names} for a {n}-label classifier")
    return {"architectures": [f"{arch}ForSequenceClassification"], "num_labels": n,
            "id2label": {str(i): name for i, name in enumerate(names)},
            "label2id": {name: i for i, name in enumerate(names)},
            "problem_type": "regression" if n == 1 else "single_label_classification",
            "classifier_dropout": model.dropout_rate}


def config_from_hf(hf: dict, **overrides) -> EncoderConfig:
    """Our config from a transformers config.json dict (BERT or MobileBERT)."""
    fields = {f for f in EncoderConfig.__dataclass_fields__}
    kind = hf.get("model_type")
    if kind == "bert":
        base = dict(embedding_size=hf["hidden_size"], trigram_input=False, use_bottleneck=False,
                    intra_bottleneck_size=hf["hidden_size"], use_bottleneck_attention=False,
                    key_query_shared_bottleneck=False, num_feedforward_networks=1, normalization_type="layer_norm",
                    classifier_activation=True, hf_eps_quirk=False)
    elif kind == "mobilebert":
        base = dict(hf_eps_quirk=True)
    else:
        raise ConversionError(f"config.json model_type={kind!r} is not supported; valid: 'bert', 'mobilebert'")
    known = {k: v for k, v in hf.items() if k in fields}
    return EncoderConfig(**{**known, **base, **overrides}) if kind == "bert" else EncoderConfig(
        **{**base, **known, **overrides})


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    if not os.path.exists(path):
        raise ConversionError(f"no such checkpoint file: {path}")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ConversionError(f"cannot read safetensors file {path}: {e}") from e


def save_hf(model: nnx.Module, directory: str, label_names=None) -> None:
    """Writes `model.safetensors` + `config.json` loadable by transformers' `from_pretrained`.

    Encoder -> *Model, PreTrainingModel -> *ForPreTraining, SequenceClassificationModel -> *ForSequenceClassification
    (num_labels=1: problem_type 'regression'; `label_names` fill id2label/label2id), SpanModel ->
    *ForQuestionAnswering.
    """
    from safetensors.numpy import save_file
    cfg = _cfg_of(model)
    check_hf_expressible(cfg, uses_pooler=not isinstance(model, (Encoder, SpanModel)))
    os.makedirs(directory, exist_ok=True)
    sd = to_hf_state_dict(model)
    if isinstance(model, PreTrainingModel):  # transformers re-ties these on load; safetensors forbids shared memory
        sd.pop("cls.predictions.decoder.weight")
        sd.pop("cls.predictions.decoder.bias")
    save_file(sd, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    config = config_to_hf(cfg)
    if isinstance(model, _TASK_MODELS):
        config.update(task_config(model, label_names))
    elif not isinstance(model, PreTrainingModel):
        config["architectures"] = ["BertModel" if config["model_type"] == "bert" else "MobileBertModel"]
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def _read_hf(directory: str, config_overrides: dict) -> tuple[dict, EncoderConfig, dict[str, np.ndarray]]:
    """(config.json dict, our config, state dict) of a transformers directory."""
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.exists(cfg_path):
        raise ConversionError(f"no config.json in {directory}")
    with open(cfg_path) as f:
        hf_config = json.load(f)
    cfg = config_from_hf(hf_config, **config_overrides)
    return hf_config, cfg, read_safetensors(os.path.join(directory, "model.safetensors"))


# The pre-training heads by their transformers name prefix.
PRETRAINING_HEADS = (("mlm", "cls.predictions."), ("nsp", "cls.seq_relationship."))


def load_hf_pretraining(directory: str, seed: int = 0, **config_overrides) -> tuple[PreTrainingModel, tuple[str, ...]]:
    """(PreTrainingModel, names of the heads that had to be freshly initialised) from a transformers directory.

    A checkpoint with MLM and NSP heads (*ForPreTraining) loads exactly, as `load_hf(pretraining=True)` always did. A
    head with no tensor at all in the file (a bare `BertModel` such as all-MiniLM-L6-v2, with or without the 'bert.'
    prefix) is initialised from `seed` and named in the result, so that callers can say so; a head present only in
    part is an error. Everything else is loaded strictly.
    """
    _, cfg, sd = _read_hf(directory, config_overrides)
    sd = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
          for k, v in sd.items()}
    model = PreTrainingModel(cfg, nnx.Rngs(seed))
    fresh = tuple(name for name, hf in PRETRAINING_HEADS if not any(k.startswith(hf) for k in sd))
    if fresh:
        arch, prefix = hf_arch(cfg) + ".", _detect_prefix(sd, cfg)
        if prefix != arch:  # a bare or differently prefixed backbone: the names PreTrainingModel expects
            sd = {k if k.startswith(_HEAD_PREFIXES) or not k.startswith(prefix) else arch + k[len(prefix):]: v
                  for k, v in sd.items()}
        initial = to_hf_state_dict(model)
        for name, hf in PRETRAINING_HEADS:
            if name in fresh:
                sd.update({k: v for k, v in initial.items() if k.startswith(hf) and ".decoder." not in k})
    load_hf_state_dict(model, sd)
    return model, fresh


def load_hf(directory: str, pretraining: bool | None = None, **config_overrides) -> nnx.Module:
    """Builds our model from a transformers directory (config.json + model.safetensors).

    `pretraining=None` picks by the file's heads: PreTrainingModel (MLM/NSP), SequenceClassificationModel
    (`classifier`, num_labels from its shape), SpanModel (`qa_outputs`), else the bare Encoder. `pretraining=True`
    forces PreTrainingModel (`load_hf_pretraining`: heads missing from the file are freshly initialised, with a
    warning), `False` the bare Encoder (any head is then ignored).
    """
    if pretraining:
        model, fresh = load_hf_pretraining(directory, **config_overrides)
        if fresh:
            warnings.warn(f"{directory} has no {' / '.join(n.upper() for n in fresh)} head: freshly initialised "
                          f"(train it before using the model's predictions)", stacklevel=2)
        return model
    hf_config, cfg, sd = _read_hf(directory, config_overrides)
    if pretraining is None:
        pretraining = "cls.seq_relationship.weight" in sd
        if not pretraining and "classifier.weight" in sd:
            model = SequenceClassificationModel(cfg, int(np.shape(sd["classifier.weight"])[0]), nnx.Rngs(0),
                                                classifier_dropout=hf_config.get("classifier_dropout"))
            load_hf_state_dict(model, sd)
            return model
        if not pretraining and "qa_outputs.weight" in sd:
            model = SpanModel(cfg, nnx.Rngs(0))
            load_hf_state_dict(model, sd)
            return model
    model = PreTrainingModel(cfg, nnx.Rngs(0)) if pretraining else Encoder(cfg, nnx.Rngs(0))
    load_hf_state_dict(model, sd)
    return model
