"""Small helpers shared by the loss modules (float32 casting, masked means, field access)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

# Finite stand-in for "minus infinity": scores at or below it (finfo.min, -inf) are clamped to it,
# and masked keys / relation entries are set to it. exp(MASK_FLOOR - anything real) == 0 in float32.
MASK_FLOOR = -1e30


def f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def teacher(x) -> jax.Array:
    """Teacher arrays are constants for the loss: float32 and no gradient."""
    return jax.lax.stop_gradient(f32(x))


def masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean of `values` over the positions where `mask` (broadcastable, 1 = keep) is non-zero.

    With no mask it is the plain mean. Masked positions are selected out (not multiplied by 0), so an
    inf/NaN there cannot leak. An all-zero mask gives 0.
    """
    values = f32(values)
    if mask is None:
        return jnp.mean(values)
    m = jnp.broadcast_to(f32(mask), values.shape)
    total = jnp.sum(jnp.where(m > 0, values * m, 0.0))
    return total / jnp.maximum(jnp.sum(m), 1.0)


def field(obj: Any, name: str) -> Any:
    """`obj.name` or `obj[name]` (EncoderOutput-like dataclasses, namedtuples and dicts alike)."""
    if isinstance(obj, dict) or (hasattr(obj, "keys") and not hasattr(obj, name)):
        return obj[name]
    return getattr(obj, name)
