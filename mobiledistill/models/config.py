"""Encoder configuration and the named presets (SPEC §2).

Field names follow `transformers.MobileBertConfig` so that Hugging Face checkpoints convert directly; the few extra
fields (compute dtype, mask form, SPS layer plan, transformers' eps quirk, the classifier read-out) are ours.
"""

from __future__ import annotations

import dataclasses
from typing import Any

ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "tanh")
NORMALIZATIONS = ("layer_norm", "no_norm")
DTYPES = ("float32", "bfloat16")
REMAT = ("none", "full", "dots")
POOLINGS = ("cls", "mean")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """One configurable encoder: BERT, IB-BERT, MobileBERT, MobileBERT_TINY and SPS students.

    `attention_mask_value`: 'min' adds `finfo(float32).min` to masked scores (transformers); a number replaces masked
    scores by exactly that value (the official TF1 MobileBERT code uses -6, which is quantisation friendly).
    `hidden_act`: 'gelu' is the exact erf GELU (transformers), 'gelu_new'/'gelu_pytorch_tanh' the tanh approximation
    (official TF code).
    `hf_eps_quirk`: transformers' MobileBERT builds two LayerNorms per model part (the embedding norm and each layer's
    `output.LayerNorm`) with torch's default eps 1e-5 instead of `layer_norm_eps`; True reproduces that. It only
    matters for `normalization_type='layer_norm'`.
    `layer_plan`: Shuffled Parameter Sharing (Pea-KD) execution plan, a tuple of (layer index, swap_qk) pairs; None runs
    layers 0..L-1 once, unswapped.
    `scan_layers`: run the layers with `jax.lax.scan` over their stacked parameters (one compiled block instead of L;
    same outputs and parameter paths). With `num_layers` set (progressive stages) the last layer runs explicitly.
    `remat`: `jax.checkpoint` on each block: 'none', 'full' (recompute everything in the backward pass) or 'dots'
    (keep the dense-layer matmul outputs, recompute attention and element-wise work).
    """

    vocab_size: int = 30522
    hidden_size: int = 512
    num_hidden_layers: int = 24
    num_attention_heads: int = 4
    intermediate_size: int = 512
    hidden_act: str = "relu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    embedding_size: int = 128
    trigram_input: bool = True
    use_bottleneck: bool = True
    intra_bottleneck_size: int = 128
    use_bottleneck_attention: bool = False
    key_query_shared_bottleneck: bool = True
    num_feedforward_networks: int = 4
    normalization_type: str = "no_norm"
    classifier_activation: bool = False
    # Ours.
    dtype: str = "float32"
    attention_mask_value: Any = "min"
    hf_eps_quirk: bool = True
    layer_plan: tuple[tuple[int, bool], ...] | None = None
    scan_layers: bool = False
    remat: str = "none"
    # 'cls': the first token (through the tanh pooler when classifier_activation), as BERT and MobileBERT;
    # 'mean': the mean of the last layer over real tokens, no pooler (sentence-transformers' read-out, e.g.
    # all-MiniLM-L6-v2, whose lower-layer [CLS] is nearly input-independent).
    classifier_pooling: str = "cls"

    def __post_init__(self):
        if self.layer_plan is not None:  # normalise lists (e.g. from JSON/ml_collections) to hashable tuples
            object.__setattr__(self, "layer_plan", tuple((int(i), bool(s)) for i, s in self.layer_plan))
        self.validate()

    @property
    def true_hidden_size(self) -> int:
        """Width inside a block: the intra-bottleneck size, or hidden_size without bottlenecks."""
        return self.intra_bottleneck_size if self.use_bottleneck else self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.true_hidden_size // self.num_attention_heads

    @property
    def plan(self) -> tuple[tuple[int, bool], ...]:
        """The executed (layer index, swap_qk) sequence."""
        if self.layer_plan is None:
            return tuple((i, False) for i in range(self.num_hidden_layers))
        return self.layer_plan

    @property
    def has_embedding_transformation(self) -> bool:
        return self.trigram_input or self.embedding_size != self.hidden_size

    def replace(self, **changes) -> EncoderConfig:
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown encoder config field(s) {unknown}; valid: {sorted(self.to_dict())}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        def bad(msg):
            raise ValueError(f"invalid encoder config: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size", "embedding_size", "intra_bottleneck_size",
                     "num_feedforward_networks"):
            if int(getattr(self, name)) < 1:
                bad(f"{name}={getattr(self, name)} must be a positive integer")
        if self.hidden_act not in ACTIVATIONS:
            bad(f"hidden_act={self.hidden_act!r}; valid: {', '.join(ACTIVATIONS)}")
        if self.normalization_type not in NORMALIZATIONS:
            bad(f"normalization_type={self.normalization_type!r}; valid: {', '.join(NORMALIZATIONS)}")
        if self.dtype not in DTYPES:
            bad(f"dtype={self.dtype!r}; valid: {', '.join(DTYPES)} (float16 overflows with NoNorm activations)")
        if self.classifier_pooling not in POOLINGS:
            bad(f"classifier_pooling={self.classifier_pooling!r}; valid: {', '.join(POOLINGS)}")
        if self.remat not in REMAT:
            bad(f"remat={self.remat!r}; valid: {', '.join(REMAT)}")
        if self.true_hidden_size % self.num_attention_heads:
            bad(f"attention width {self.true_hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}")
        if self.attention_mask_value != "min" and not isinstance(self.attention_mask_value, (int, float)):
            bad(f"attention_mask_value={self.attention_mask_value!r}; valid: 'min' or a number such as -6")
        if self.use_bottleneck_attention and self.key_query_shared_bottleneck:
            bad("use_bottleneck_attention and key_query_shared_bottleneck are exclusive")
        if (self.use_bottleneck_attention or self.key_query_shared_bottleneck) and not self.use_bottleneck:
            bad("bottleneck attention inputs need use_bottleneck=True")
        if self.embedding_size > self.hidden_size:
            bad(f"embedding_size={self.embedding_size} exceeds hidden_size={self.hidden_size}")
        for i, _ in self.plan:
            if not 0 <= i < self.num_hidden_layers:
                bad(f"layer_plan index {i} outside 0..{self.num_hidden_layers - 1}")
        if not 0.0 <= self.hidden_dropout_prob < 1.0 or not 0.0 <= self.attention_probs_dropout_prob < 1.0:
            bad("dropout probabilities must lie in [0, 1)")


_MOBILEBERT = dict()  # the dataclass defaults are MobileBERT (official uncased_L-24_H-128_B-512_A-4_F-4_OPT)

_BERT_BASE = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
    hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, embedding_size=768, trigram_input=False,
    use_bottleneck=False, intra_bottleneck_size=768, use_bottleneck_attention=False, key_query_shared_bottleneck=False,
    num_feedforward_networks=1, normalization_type="layer_norm", classifier_activation=True, hf_eps_quirk=False,
)

PRESETS: dict[str, dict[str, Any]] = {
    "bert_base": _BERT_BASE,
    "bert_large": {**_BERT_BASE, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                   "intermediate_size": 4096, "embedding_size": 1024, "intra_bottleneck_size": 1024},
    # IB-BERT_LARGE teacher: 512-wide feature maps, 1024-wide blocks, Q/K/V from the 512-d block input.
    "ib_bert_large": dict(
        hidden_size=512, num_hidden_layers=24, num_attention_heads=4, intermediate_size=4096, hidden_act="gelu",
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, embedding_size=128, trigram_input=True,
        use_bottleneck=True, intra_bottleneck_size=1024, use_bottleneck_attention=False,
        key_query_shared_bottleneck=False, num_feedforward_networks=1, normalization_type="layer_norm",
        classifier_activation=True, hf_eps_quirk=False,  # transformers cannot build IB-BERT: no quirk to match
    ),
    "mobilebert": _MOBILEBERT,
    "mobilebert_tiny": dict(num_feedforward_networks=2, use_bottleneck_attention=True,
                            key_query_shared_bottleneck=False),
    "mobilebert_no_opt": dict(normalization_type="layer_norm", hidden_act="gelu"),
}

# Reduced sizes for tests and laptop runs: same structure, tiny widths.
_TEST = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
             embedding_size=16)
PRESETS.update({
    "test_bert": {**_BERT_BASE, **_TEST, "intermediate_size": 48, "embedding_size": 32, "intra_bottleneck_size": 32},
    "test_ib_bert": {**PRESETS["ib_bert_large"], **_TEST, "intra_bottleneck_size": 64, "intermediate_size": 96},
    "test_mobilebert": {**_TEST, "intra_bottleneck_size": 16, "intermediate_size": 24},
    "test_mobilebert_tiny": {**PRESETS["mobilebert_tiny"], **_TEST, "intra_bottleneck_size": 16,
                             "intermediate_size": 24},
    "test_mobilebert_no_opt": {**PRESETS["mobilebert_no_opt"], **_TEST, "intra_bottleneck_size": 16,
                               "intermediate_size": 24},
})


def preset(name: str, **overrides) -> EncoderConfig:
    """The named preset (SPEC §2 table), optionally with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid: {', '.join(sorted(PRESETS))}")
    fields = {**PRESETS[name], **overrides}
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(EncoderConfig)})
    if unknown:
        raise ValueError(f"unknown encoder config field(s) {unknown} for preset {name!r}")
    return EncoderConfig(**fields)
