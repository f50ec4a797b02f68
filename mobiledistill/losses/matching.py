"""Layer matching between a teacher and a student of other depths (CKD's presets), shared by every layer-wise term:
CKD relations, MiniLMv2 attention relations and the MobileBERT transfer stages."""

from __future__ import annotations

import math
import operator

MATCHING_PRESETS = ("emb+skip", "skip", "last", "uniform")


def match_layers(num_teacher_layers: int, num_student_layers: int,
                 preset: str = "emb+skip") -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(teacher indices, student indices) into `hidden_states` (0 = embedding output, k = layer k).

    - 'emb+skip': g = gcd(L_T, L_S); teacher {0, L_T/g, ..., L_T} vs student {0, L_S/g, ..., L_S}
      (12->6: teacher 0,2,...,12 vs student 0..6; 24->24: identity; 12->5: only {0, last}).
    - 'skip': the same without the embedding output.
    - 'last': only the last layers (one pair: enough for WR, too few for LTR).
    - 'uniform': every student layer k = 1..L_S against teacher round(k * L_T / L_S) (halves up); needs
      L_S <= L_T (a deeper student would repeat teacher layers).
    """
    try:
        lt, ls = operator.index(num_teacher_layers), operator.index(num_student_layers)
    except TypeError:
        lt = ls = 0
    if lt < 1 or ls < 1:
        raise ValueError(f"match_layers: layer counts must be positive ints, got teacher {num_teacher_layers!r}, "
                         f"student {num_student_layers!r}")
    if preset in ("emb+skip", "skip"):
        g = math.gcd(lt, ls)
        first = 0 if preset == "emb+skip" else 1
        return (tuple(k * (lt // g) for k in range(first, g + 1)), tuple(k * (ls // g) for k in range(first, g + 1)))
    if preset == "last":
        return (lt,), (ls,)
    if preset == "uniform":
        if ls > lt:
            raise ValueError(f"match_layers: 'uniform' needs a student no deeper than the teacher (got {lt} teacher, "
                             f"{ls} student layers); use 'emb+skip' or 'skip'")
        return tuple((2 * k * lt + ls) // (2 * ls) for k in range(1, ls + 1)), tuple(range(1, ls + 1))
    raise ValueError(f"match_layers: unknown preset {preset!r}; valid: {MATCHING_PRESETS}")
