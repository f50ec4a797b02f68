"""Parameter paths as '/'-joined strings (`encoder/layers/3/query/kernel`): what learning-rate rules, masks and
the optimizer's layer stacks match on."""

from __future__ import annotations

from typing import Any, Sequence

import jax


def _key_str(key: Any) -> str:
    for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_to_str(path: Sequence[Any]) -> str:
    """jax tree path (DictKey, GetAttrKey, SequenceKey, nnx path tuples of str/int) -> 'a/b/0/c'.

    The trailing `.value` of an `nnx.Variable` leaf is dropped, so an `nnx.State` and the
    equivalent pure dict give the same strings.
    """
    keys = list(path)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return "/".join(_key_str(k) for k in keys)


def param_paths(params: Any) -> list[str]:
    """All leaf path strings of a parameter pytree, in flatten order."""
    return [path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
