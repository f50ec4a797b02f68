"""The optimizer over layer stacks: same-shaped per-layer parameters updated as one stacked array.

Parameters stay stored per layer (`encoder/layers/3/query/kernel`), so checkpoints, Hugging Face conversion, export
and the per-layer learning-rate rules keep their paths. Inside the update, the leaves of layers 0..L-1 that share a
suffix become one array with a leading layer axis under the path `encoder/layers/*/query/kernel`: the optimizer's
element-wise chain is then traced and compiled once per suffix instead of once per layer (24-layer MobileBERT: 1,119
leaves -> 46 stacked + 15 others). `optim` reads a `*` path as "layer i along axis 0": per-layer learning-rate scales
become vectors over that axis and the LAMB trust ratio is taken per layer. Only trainable leaves are stacked, so frozen
layers keep no optimizer state and their exact -0.0 update, as before.

`optim.make_optimizer` wraps its optimizer in `over_layer_stacks`; `steps.make_train_step` goes further and takes
the gradients in the stacked view itself, so that the scanned layers' stacked gradients reach the optimizer without a
per-layer round trip. The optimizer state holds the stacked form. `convert_state` reads a state written per leaf
(before this form existed, or with `OptimizerConfig.stack_layers=False`) into the stacked one, by path
(`optim.per_leaf_reader`: convert on read when a checkpoint is restored).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from mobiledistill.tree_paths import path_to_str

WILDCARD = "*"
_LAYER = re.compile(r"(^|/)layers/(\d+)/")


def stack_key(path: str) -> tuple[str, int] | None:
    """('encoder/layers/*/query/kernel', 3) for 'encoder/layers/3/query/kernel'; None for a path outside a layer."""
    m = _LAYER.search(path)
    if m is None:
        return None
    return path[:m.start(2)] + WILDCARD + path[m.end(2):], int(m.group(2))


def layer_path(path: str, n: int) -> str | None:
    """Layer n's path of a stacked path ('encoder/layers/*/q' -> 'encoder/layers/3/q'); None for an unstacked one."""
    parts = path.split("/")
    if WILDCARD not in parts:
        return None
    i = parts.index(WILDCARD)
    return "/".join(parts[:i] + [str(n)] + parts[i + 1:])


def layout(tree, stackable: Callable[[str], bool] | None = None) -> list[tuple[str, list[int]]]:
    """The stacked view's entries in flatten order: (path, indices of the tree's leaves it holds). Leaves of layers
    0..n-1 (n >= 2) with one suffix, shape and dtype form one entry, when `stackable(path)` holds for each (the
    optimizer stacks its trainable leaves only: frozen ones keep no state); every other leaf is an entry of its own."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    paths = [path_to_str(p) for p, _ in flat]
    groups: dict[str, list[tuple[int, int]]] = {}
    for i, p in enumerate(paths):
        key = stack_key(p)
        if key is not None and (stackable is None or stackable(p)):
            groups.setdefault(key[0], []).append((key[1], i))
    stacked = {}
    for key, members in groups.items():
        layers = [n for n, _ in members]
        leaves = [flat[i][1] for _, i in members]
        same = len({(tuple(x.shape), x.dtype) for x in leaves}) == 1
        if len(members) >= 2 and layers == list(range(len(members))) and same:
            stacked[members[0][1]] = (key, [i for _, i in members])
    entries, taken = [], {i for _, idx in stacked.values() for i in idx}
    for i, p in enumerate(paths):
        if i in stacked:
            entries.append(stacked[i])
        elif i not in taken:
            entries.append((p, [i]))
    return entries


def to_view(tree, stackable: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """{path: leaf or layer-stacked leaf} of a parameter-shaped tree (see `layout`)."""
    leaves = jax.tree.leaves(tree)
    return {path: (jnp.stack([leaves[i] for i in idx]) if len(idx) > 1 else leaves[idx[0]])
            for path, idx in layout(tree, stackable)}


def from_view(view: dict[str, Any], like, stackable: Callable[[str], bool] | None = None) -> Any:
    """The inverse of `to_view`, into the structure of `like`."""
    treedef = jax.tree.structure(like)
    leaves: list[Any] = [None] * treedef.num_leaves
    for path, idx in layout(like, stackable):
        if len(idx) == 1:
            leaves[idx[0]] = view[path]
        else:  # split, not x[n]: its gradient is one concatenate, where indexing's is a pad + add per layer
            for i, part in zip(idx, jnp.split(view[path], len(idx))):
                leaves[i] = part[0]
    return jax.tree.unflatten(treedef, leaves)


def over_layer_stacks(inner: optax.GradientTransformation,
                      stackable: Callable[[str], bool] | None = None) -> optax.GradientTransformation:
    """`inner` applied to the stacked view of the parameters, gradients and updates."""

    def init_fn(params):
        return inner.init(to_view(params, stackable))

    def update_fn(updates, state, params=None):
        view_params = None if params is None else to_view(params, stackable)
        new, state = inner.update(to_view(updates, stackable), state, view_params)
        return from_view(new, updates, stackable), state

    return optax.GradientTransformation(init_fn, update_fn)


def convert_state(per_leaf_state, stacked_like):
    """A per-leaf optimizer state (paths `.../mu/encoder/layers/3/query/kernel`) in the structure of the stacked
    state `stacked_like` (`.../mu/encoder/layers/*/query/kernel`): same-path leaves are taken, `*` leaves stacked."""
    old = {path_to_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(per_leaf_state)[0]}

    def take(path, like):
        p = path_to_str(path)
        if p in old:
            return old[p]
        if layer_path(p, 0) is None:
            raise KeyError(f"optimizer state: no leaf {p!r} in the checkpoint")
        return jnp.stack([old[layer_path(p, n)] for n in range(like.shape[0])])

    return jax.tree_util.tree_map_with_path(take, stacked_like)

