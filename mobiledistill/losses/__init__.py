"""Pure loss functions (float32 inside; each documents its reduction and mask handling).

- `transfer`: MobileBERT layer-wise transfer (feature maps, mean/variance, attention).
- `distill`: MLM/NSP, pre-training distillation, task logit KD, regression KD, patient KD.
- `relations`: CKD word / layer-transforming relations (WR, LTR), layer matching, per-task CKD weights.
- `registry`: named terms `fn(teacher_out, student_out, batch) -> scalar` and `build_loss`.
"""

from mobiledistill.losses.distill import (
    cls_patience_loss,
    cross_entropy,
    kl_divergence,
    logit_kd_loss,
    mlm_accuracy,
    mlm_distill_loss,
    mlm_loss,
    mse_loss,
    nsp_loss,
    patient_kd_loss,
    soft_cross_entropy,
)
from mobiledistill.losses.registry import LOSS_REGISTRY, LossFn, build_loss, make_loss, register_loss
from mobiledistill.losses.relations import (
    CKD_TASK_HPARAMS,
    MATCHING_PRESETS,
    ckd_relation_spec,
    ckd_task_hparams,
    ckd_task_loss,
    ckd_task_loss_spec,
    ltr_angle_loss,
    ltr_loss,
    ltr_pair_loss,
    match_layers,
    window_bounds,
    wr_angle_loss,
    wr_loss,
    wr_pair_loss,
)
from mobiledistill.losses.transfer import (
    DEFAULT_LN_EPS,
    DEFAULT_TRANSFER_WEIGHTS,
    attention_transfer,
    feature_map_transfer,
    layer_norm,
    layer_transfer_loss,
    masked_log_softmax,
    mean_transfer,
    mean_transfer_official,
    variance_transfer,
    variance_transfer_official,
)

__all__ = [
    "DEFAULT_LN_EPS",
    "DEFAULT_TRANSFER_WEIGHTS",
    "LOSS_REGISTRY",
    "LossFn",
    "attention_transfer",
    "build_loss",
    "cls_patience_loss",
    "cross_entropy",
    "feature_map_transfer",
    "kl_divergence",
    "layer_norm",
    "layer_transfer_loss",
    "logit_kd_loss",
    "make_loss",
    "masked_log_softmax",
    "mean_transfer",
    "mean_transfer_official",
    "mlm_accuracy",
    "mlm_distill_loss",
    "mlm_loss",
    "mse_loss",
    "nsp_loss",
    "patient_kd_loss",
    "register_loss",
    "soft_cross_entropy",
    "variance_transfer",
    "variance_transfer_official",
]
__all__ += [
    "CKD_TASK_HPARAMS",
    "MATCHING_PRESETS",
    "ckd_relation_spec",
    "ckd_task_hparams",
    "ckd_task_loss",
    "ckd_task_loss_spec",
    "ltr_angle_loss",
    "ltr_loss",
    "ltr_pair_loss",
    "match_layers",
    "window_bounds",
    "wr_angle_loss",
    "wr_loss",
    "wr_pair_loss",
]
