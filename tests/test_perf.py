"""Performance accounting helpers: the HLO dot census used by the train-step benchmark's profile."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mobiledistill import perf


def _compiled(f, *args):
    return jax.jit(f).lower(*args).compile()


def test_hlo_dots_finds_every_matmul_with_its_shapes_and_flops():
    x, w1, w2 = jnp.ones((4, 16, 32)), jnp.ones((32, 48)), jnp.ones((48, 8))

    def f(x, w1, w2):
        h = jnp.tanh(x @ w1)  # (4, 16, 48)
        scores = jnp.einsum("bqd,bkd->bqk", h, h)  # batched: (4, 16, 16)
        return (scores @ h) @ w2  # batched, then plain

    compiled = _compiled(f, x, w1, w2)
    dots = perf.hlo_dots(compiled.as_text())
    expected = 2 * (4 * 16 * 32 * 48 + 4 * 16 * 16 * 48 + 4 * 16 * 16 * 48 + 4 * 16 * 48 * 8)
    assert sum(d["flops"] for d in dots) == expected
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert cost["flops"] >= expected  # XLA also counts the tanh
    for d in dots:  # each dot replays standalone at its shapes with the same result shape
        out = jax.eval_shape(functools.partial(jax.lax.dot_general, dimension_numbers=d["dims"]),
                             jax.ShapeDtypeStruct(d["lhs"], jnp.float32), jax.ShapeDtypeStruct(d["rhs"], jnp.float32))
        assert out.shape == d["out"]


def test_hlo_dots_of_a_gradient_include_the_backward_matmuls():
    x, w = jnp.ones((64, 32)), jnp.ones((32, 16))
    grad = jax.grad(lambda w, x: jnp.sum(jnp.tanh(x @ w) ** 2))
    dots = perf.hlo_dots(_compiled(grad, w, x).as_text())
    assert sorted(d["flops"] for d in dots) == [2 * 64 * 32 * 16] * 2  # forward and dL/dw (dL/dx is not needed)


def test_time_dot_and_matmul_peak_are_positive_rates():
    sec = perf.time_dot((64, 32), (32, 16), (((1,), (0,)), ((), ())), repeats=3)
    assert 0 < sec < 10
    assert np.isfinite(perf.measured_matmul_peak(128, repeats=3))
