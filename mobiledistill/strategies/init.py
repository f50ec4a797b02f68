"""Student initialisation from the teacher (SPEC §4): embeddings, embedding transformation, MLM and NSP heads.

The embedding norm is not copied: a teacher's LayerNorm parameters do not map onto a student's NoNorm.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

COPIED_FROM_TEACHER = (
    ("encoder", "embeddings", "word_embeddings"),
    ("encoder", "embeddings", "position_embeddings"),
    ("encoder", "embeddings", "token_type_embeddings"),
    ("encoder", "embeddings", "embedding_transformation"),
    ("mlm",),
    ("nsp",),
)


def copy_from_teacher(student: nnx.State, teacher: nnx.State) -> nnx.State:
    """A copy of `student` with the teacher's embeddings and pre-training heads; refuses mismatched shapes."""
    s_flat = {tuple(p): v for p, v in nnx.to_flat_state(student)}
    t_flat = {tuple(p): v for p, v in nnx.to_flat_state(teacher)}
    selected = [p for p in s_flat if any(p[:len(prefix)] == prefix for prefix in COPIED_FROM_TEACHER)]
    missing = [p for p in selected if p not in t_flat]
    bad = [f"{'/'.join(map(str, p))} student {tuple(s_flat[p].shape)} vs teacher {tuple(t_flat[p].shape)}"
           for p in selected if p in t_flat and tuple(s_flat[p].shape) != tuple(t_flat[p].shape)]
    if missing or bad:
        what = [f"missing in teacher: {['/'.join(map(str, p)) for p in missing]}"] if missing else []
        what += [f"shape mismatch: {bad}"] if bad else []
        raise ValueError("cannot initialise the student from the teacher (embedding_size, hidden_size, vocab_size, "
                         "max_position_embeddings, type_vocab_size and trigram_input must match): " + "; ".join(what))
    # Copies, not references: the student's buffers are donated to the train step, the teacher's must survive.
    out = {p: (jnp.array(t_flat[p].get_value(), copy=True) if p in selected else v.get_value())
           for p, v in s_flat.items()}
    pure = {}
    for path, value in out.items():
        node = pure
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    result = nnx.State(student)
    nnx.replace_by_pure_dict(result, pure)
    return result
