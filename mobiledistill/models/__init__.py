"""Flax NNX encoder family (BERT, IB-BERT, MobileBERT, MobileBERT_TINY, SPS) and heads."""

from mobiledistill.models.accounting import (abstract_params, count_params, encoder_param_count, forward_flops)
from mobiledistill.models.config import PRESETS, EncoderConfig, preset
from mobiledistill.models.encoder import Encoder, EncoderOutput
from mobiledistill.models.heads import (MLMHead, PreTrainingModel, SequenceClassificationModel, SpanModel,
                                        gather_positions)

__all__ = [
    "PRESETS", "EncoderConfig", "preset", "Encoder", "EncoderOutput", "MLMHead", "PreTrainingModel",
    "SequenceClassificationModel", "SpanModel", "gather_positions", "abstract_params", "count_params",
    "encoder_param_count", "forward_flops",
]
