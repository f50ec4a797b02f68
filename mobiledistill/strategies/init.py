"""Student initialisation from the teacher (SPEC §4): embeddings, embedding transformation, MLM and NSP heads.

The embedding norm is not copied: a teacher's LayerNorm parameters do not map onto a student's NoNorm.
`copy_from_teacher` copies equal shapes exactly; `init_from_teacher` also takes a teacher of another embedding or
feature-map width (truncated SVD of the word-embedding table, issue 16).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
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


# --------------------------------------------------------------------------------------------------------------
# A teacher of another embedding or feature-map width
# --------------------------------------------------------------------------------------------------------------

_EMB = ("encoder", "embeddings")
_WORD = _EMB + ("word_embeddings", "embedding")
_POS = _EMB + ("position_embeddings", "embedding")
_TYPE = _EMB + ("token_type_embeddings", "embedding")
_KERNEL = _EMB + ("embedding_transformation", "kernel")
_BIAS = _EMB + ("embedding_transformation", "bias")


def truncated_svd(table, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Best rank-`rank` factorisation `table ~ factor @ basis` (Eckart-Young), in float64.

    Returns (factor = U_r diag(s_r) [V, rank], basis = V_r^T [rank, E], relative error ||table - factor @ basis||_F /
    ||table||_F). A rank >= E is exact: factor = table zero-padded to `rank` columns, basis = [I; 0].
    """
    a = np.asarray(table, np.float64)
    v, e = a.shape
    if rank >= e:
        return np.pad(a, ((0, 0), (0, rank - e))), np.eye(rank, e), 0.0
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    factor, basis = u[:, :rank] * s[:rank], vt[:rank]
    err = float(np.linalg.norm(a - factor @ basis) / max(np.linalg.norm(a), 1e-30))
    return factor, basis, err


def _embedding_map(flat: dict, cfg) -> tuple[np.ndarray, np.ndarray]:
    """(M [3E, H], b [H]) with pre-norm word part = concat(e[t+1], e[t], e[t-1]) @ M + b for any embedding layout."""
    e, h = cfg.embedding_size, cfg.hidden_size
    if cfg.trigram_input:
        return np.asarray(flat[_KERNEL], np.float64), np.asarray(flat[_BIAS], np.float64)
    mid = np.asarray(flat[_KERNEL], np.float64) if cfg.has_embedding_transformation else np.eye(e, h)
    bias = np.asarray(flat[_BIAS], np.float64) if cfg.has_embedding_transformation else np.zeros(h)
    z = np.zeros((e, h))
    return np.concatenate([z, mid, z]), bias


def _feature_basis(word_part: np.ndarray, extra: list[np.ndarray], h_t: int, h_s: int) -> np.ndarray:
    """Q [h_t, h_s]: the identity for equal widths, the top-h_s principal directions of the teacher's embedding
    output vectors for a narrower student, the identity zero-padded for a wider one."""
    if h_s == h_t:
        return np.eye(h_t)
    if h_s > h_t:
        return np.eye(h_t, h_s)
    x = np.concatenate([word_part, *extra])
    # right singular vectors of x = eigenvectors of the small Gram matrix x^T x [h_t, h_t] (fast for a 30k vocab)
    evals, evecs = np.linalg.eigh(x.T @ x)
    return evecs[:, np.argsort(evals)[::-1][:h_s]]


def init_from_teacher(student: nnx.State, teacher: nnx.State, student_cfg, teacher_cfg) -> tuple[nnx.State, dict]:
    """The student initialised from the teacher whatever their widths; returns (state, report).

    Equal shapes: `copy_from_teacher` (an exact copy). Otherwise the teacher's word-embedding table [V, E_t] is
    factorised by a truncated SVD to the student's embedding size E_s (report['svd_relative_error'] =
    ||W - U_r S_r V_r^T||_F / ||W||_F), and the embedding transformation, position and token-type embeddings are set
    so that the student's pre-norm embedding output equals the teacher's one (up to the SVD error) expressed in a
    basis Q [H_t, H_s] of the student's feature-map width: x_s = x_t Q, with Q = I for equal widths, the top-H_s
    principal directions of the teacher's embedding vectors for a narrower student, zero-padding for a wider one.
    MLM/NSP head parameters are copied where their shapes match, the others keep the student's initialisation
    (report['heads'] names them: the MLM output table splits differently when the embedding sizes differ).
    The embedding norm is never copied (LayerNorm -> NoNorm does not map); a NoNorm student starts at the identity.
    """
    s_flat = {tuple(p): v for p, v in nnx.to_flat_state(student)}
    t_flat = {tuple(p): v for p, v in nnx.to_flat_state(teacher)}
    selected = [p for p in s_flat if any(p[:len(prefix)] == prefix for prefix in COPIED_FROM_TEACHER)]
    if all(p in t_flat and tuple(s_flat[p].shape) == tuple(t_flat[p].shape) for p in selected):
        return copy_from_teacher(student, teacher), {"embeddings": "copied", "heads": "copied",
                                                     "svd_relative_error": 0.0}
    sc, tc = student_cfg, teacher_cfg
    problems = [f"{name} student {getattr(sc, name)} vs teacher {getattr(tc, name)}"
                for name in ("vocab_size", "type_vocab_size") if getattr(sc, name) != getattr(tc, name)]
    if sc.max_position_embeddings > tc.max_position_embeddings:
        problems.append(f"max_position_embeddings student {sc.max_position_embeddings} > teacher "
                        f"{tc.max_position_embeddings}")
    if tc.trigram_input and not sc.trigram_input:
        problems.append("the teacher's trigram embedding needs a trigram_input student")
    if problems:
        raise ValueError("cannot initialise the student from a teacher of another width: " + "; ".join(problems))
    t = {p: np.asarray(v.get_value(), np.float64) for p, v in t_flat.items()}
    m_t, b_t = _embedding_map(t, tc)
    w = t[_WORD]
    e_t, e_s = tc.embedding_size, sc.embedding_size
    blocks = [w @ m_t[i * e_t:(i + 1) * e_t] for i in range(3)]
    q = _feature_basis(np.concatenate(blocks), [t[_POS], t[_TYPE]], tc.hidden_size, sc.hidden_size)
    values = {_POS: t[_POS][:sc.max_position_embeddings] @ q, _TYPE: t[_TYPE] @ q}
    if sc.has_embedding_transformation:
        factor, basis, err = truncated_svd(w, e_s)
        m_s = np.concatenate([basis @ m_t[i * e_t:(i + 1) * e_t] for i in range(3)]) @ q  # [3 E_s, H_s]
        values[_WORD] = factor
        values[_KERNEL] = m_s if sc.trigram_input else m_s[e_s:2 * e_s]
        values[_BIAS] = b_t @ q
    else:  # the table itself lives in the feature-map space (BERT-shaped student)
        target = blocks[1]
        values[_WORD] = target @ q
        err = float(np.linalg.norm(values[_WORD] @ q.T - target) / max(np.linalg.norm(target), 1e-30))
    heads = [p for p in selected if p[0] in ("mlm", "nsp")]
    kept = ["/".join(map(str, p)) for p in heads if p not in t_flat or tuple(s_flat[p].shape) != tuple(t[p].shape)]
    values.update({p: t[p] for p in heads if "/".join(map(str, p)) not in kept})
    out = {}
    for path, v in s_flat.items():
        if path in values:
            new = np.asarray(values[path], np.float32)
            assert new.shape == tuple(v.shape), (path, new.shape, v.shape)
            out[path] = jnp.asarray(new, v.get_value().dtype)
        else:
            out[path] = v.get_value()
    result = nnx.State(student)
    nnx.replace_by_pure_dict(result, _nest(out))
    report = {"embeddings": f"truncated SVD {e_t} -> {e_s}" if sc.has_embedding_transformation else
              f"projected {tc.hidden_size} -> {sc.hidden_size}", "svd_relative_error": err,
              "feature_map": f"{tc.hidden_size} -> {sc.hidden_size}",
              "heads": "copied" if not kept else f"copied where shapes match; student initialisation: {kept}"}
    return result, report


def _nest(flat: dict) -> dict:
    pure: dict = {}
    for path, value in flat.items():
        node = pure
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return pure
