"""Pea-KD (Cho & Kang): Shuffled Parameter Sharing plans and Pretraining with Teacher's Predictions labels.

SPS plans are `EncoderConfig.layer_plan` values, tuples of (layer index, swap_qk) pairs:

    paired_plan(L)          layers 0..L-1, then 0..L-1 again with Query and Key swapped (2L effective layers)
    top_layers_plan(L, 3)   the official 6-layer variant: layers 0..L-1, then the top three again, swapped

PTP labels (4-way) come from the fine-tuned teacher's logits and the gold labels, conf = max softmax probability:
0 correct & conf > t1, 1 correct & conf <= t1, 2 wrong & conf > t2, 3 wrong & conf <= t2. `PTP_THRESHOLDS` holds the
official per-task (t1, t2); task names are matched case-insensitively (the official code compares 'SST-2'/'QNLI'
against lower-case names and crashes for those tasks; we accept 'sst2', 'SST-2', 'sst-2', ...).
"""

from __future__ import annotations

import numpy as np

PTP_THRESHOLDS: dict[str, tuple[float, float]] = {
    "rte": (0.8, 0.6),
    "mrpc": (0.95, 0.75),
    "sst2": (0.98, 0.8),
    "qnli": (0.98, 0.7),
}
PTP_NUM_LABELS = 4


def paired_plan(num_layers: int) -> tuple[tuple[int, bool], ...]:
    """Layers 0..L-1 unswapped, then 0..L-1 again with Q/K swapped."""
    if num_layers < 1:
        raise ValueError(f"paired_plan: num_layers={num_layers} must be >= 1")
    return tuple((i, False) for i in range(num_layers)) + tuple((i, True) for i in range(num_layers))


def top_layers_plan(num_layers: int, top: int = 3) -> tuple[tuple[int, bool], ...]:
    """Layers 0..L-1 unswapped, then the top `top` layers (L-top..L-1) again with Q/K swapped."""
    if not 1 <= top <= num_layers:
        raise ValueError(f"top_layers_plan: top={top} must lie in 1..num_layers={num_layers}")
    return tuple((i, False) for i in range(num_layers)) + tuple((i, True) for i in range(num_layers - top,
                                                                                        num_layers))


def ptp_thresholds(task: str) -> tuple[float, float]:
    """The official (t1, t2) of `task`, any case and with or without a dash ('SST-2' == 'sst2')."""
    key = task.lower().replace("-", "").replace("_", "")
    if key not in PTP_THRESHOLDS:
        raise ValueError(f"no PTP thresholds for task {task!r}; official: {', '.join(PTP_THRESHOLDS)}")
    return PTP_THRESHOLDS[key]


def ptp_labels(teacher_logits, labels, t1: float, t2: float) -> np.ndarray:
    """[N, C] teacher logits (any C >= 2) and [N] gold labels -> [N] int32 PTP labels in {0, 1, 2, 3}."""
    logits = np.asarray(teacher_logits, np.float64)
    labels = np.asarray(labels)
    if logits.ndim != 2 or logits.shape[1] < 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"ptp_labels: need [N, C>=2] logits and [N] labels, got {logits.shape} and {labels.shape}")
    z = logits - logits.max(-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    conf = probs.max(-1)
    correct = logits.argmax(-1) == labels
    out = np.where(correct, np.where(conf > t1, 0, 1), np.where(conf > t2, 2, 3))
    return out.astype(np.int32)


def patience_layers(student_layers: int, teacher_layers: int) -> tuple[list[int], list[int]]:
    """PKD-skip mapping over hidden_states indices: student 1..Ls-1 -> teacher round(i * Lt / Ls) (6 -> 12: teacher
    2, 4, 6, 8, 10)."""
    if not 2 <= student_layers <= teacher_layers:
        raise ValueError(f"patience_layers: need 2 <= student layers ({student_layers}) <= teacher layers "
                         f"({teacher_layers})")
    s = list(range(1, student_layers))
    return s, [round(i * teacher_layers / student_layers) for i in s]
