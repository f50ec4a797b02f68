"""Optimizer: LAMB/AdamW vs NumPy references, freezing, LR scales, schedules, accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mobiledistill import optim, steps


def _params(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    return {
        "encoder": {
            "embeddings": {"word_embeddings": {"embedding": f(6, 4)}, "norm": {"scale": f(4)}},
            "layers": {
                0: {
                    "query": {"kernel": f(4, 4), "bias": f(4)},
                    "attention_output": {"norm": {"scale": f(4), "bias": f(4)}},
                },
                1: {"query": {"kernel": f(4, 4), "bias": jnp.zeros(4)}},
            },
        },
        "mlm": {"bias": f(6), "transform": {"kernel": f(4, 4)}},
    }


def _grads(step, params):
    rng = np.random.default_rng(100 + step)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 3, jnp.float32), params)


def _flat(tree):
    return {optim.path_to_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def np_reference(
    params, grads_seq, *, name, lr, wd=0.01, eps=1e-6, b1=0.9, b2=0.999, clip=1.0, bias_correction=True, scales=None
):
    """Hand-written LAMB / AdamW over flat {path: array} dicts, float64."""
    p = {k: v.astype(np.float64) for k, v in _flat(params).items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    scales = scales or {}
    for t, grads in enumerate(grads_seq, start=1):
        g = {k: x.astype(np.float64) for k, x in _flat(grads).items() if scales.get(k, 1.0) != 0}
        gn = np.sqrt(sum((x**2).sum() for x in g.values()))
        if clip and gn > clip:
            g = {k: x * clip / gn for k, x in g.items()}
        for k in g:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            mh, vh = (m[k] / (1 - b1**t), v[k] / (1 - b2**t)) if bias_correction else (m[k], v[k])
            u = mh / (np.sqrt(vh) + eps)
            last = k.split("/")[-1]
            excluded = last == "bias" or any("norm" in c for c in k.split("/"))
            if not excluded:
                u = u + wd * p[k]
                if name == "lamb":
                    wn, un = np.linalg.norm(p[k]), np.linalg.norm(u)
                    u = u * (wn / un if wn > 0 and un > 0 else 1.0)
            p[k] = p[k] - lr(t - 1) * scales.get(k, 1.0) * u
    return p


def _run(cfg, params, steps):
    tx = optim.make_optimizer(cfg)
    state, update = tx.init(params), jax.jit(tx.update)
    for t in range(steps):
        updates, state = update(_grads(t, params), state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("name", ["lamb", "adamw"])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_matches_numpy_reference(name, bias_correction):
    params = _params()
    cfg = optim.OptimizerConfig(
        name=name,
        learning_rate=0.05,
        schedule="warmup_linear",
        warmup_steps=1,
        total_steps=5,
        end_lr_ratio=0.1,
        bias_correction=bias_correction,
    )
    got = _flat(_run(cfg, params, 4))
    sched = optim.make_schedule(cfg)
    want = np_reference(
        params,
        [_grads(t, params) for t in range(4)],
        name=name,
        lr=lambda t: float(sched(t)),
        bias_correction=bias_correction,
    )
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6, err_msg=k)
    # the reference really distinguishes the variants
    other = np_reference(
        params,
        [_grads(t, params) for t in range(4)],
        name=name,
        lr=lambda t: float(sched(t)),
        bias_correction=not bias_correction,
    )
    assert max(np.abs(got[k] - other[k]).max() for k in want) > 1e-4


def test_trust_ratio_and_decay_masks():
    paths = optim.param_paths(_params())
    mask = dict(zip(paths, jax.tree.leaves(optim.decay_mask(_params()))))
    assert mask["encoder/layers/0/query/kernel"] and mask["encoder/embeddings/word_embeddings/embedding"]
    for k in (
        "encoder/layers/0/query/bias",
        "encoder/layers/0/attention_output/norm/scale",
        "encoder/embeddings/norm/scale",
        "mlm/bias",
    ):
        assert not mask[k], k


def test_frozen_bit_identical_and_scales_exact():
    params = _params(1)
    # a -0.0 in a frozen leaf: optax.set_to_zero would flip it to +0.0
    params["mlm"]["bias"] = params["mlm"]["bias"].at[0].set(-0.0)
    rules = (("^encoder/layers/0/", 0.1), ("^encoder/layers/1/", 1.0))
    cfg = optim.OptimizerConfig(name="lamb", learning_rate=0.01, lr_scales=rules, default_lr_scale=0.0)
    out = _run(cfg, params, 3)
    before, after = _flat(params), _flat(out)
    for k in before:
        if not k.startswith("encoder/layers/"):
            assert before[k].tobytes() == after[k].tobytes(), k
        else:
            assert not np.array_equal(before[k], after[k]), k
    assert np.signbit(after["mlm/bias"][0])
    # step 1: layer 0 moves by exactly 0.1x the update it gets at scale 1 (same trainable set)
    cfg1 = optim.OptimizerConfig(
        name="lamb", learning_rate=0.01, lr_scales=(("^encoder/layers/[01]/", 1.0),), default_lr_scale=0.0
    )
    g0 = _grads(0, params)
    u_scaled = _flat(optim.make_optimizer(cfg).update(g0, optim.make_optimizer(cfg).init(params), params)[0])
    u_plain = _flat(optim.make_optimizer(cfg1).update(g0, optim.make_optimizer(cfg1).init(params), params)[0])
    for k in before:
        if k.startswith("encoder/layers/0/"):
            np.testing.assert_array_equal(u_scaled[k], np.float32(0.1) * u_plain[k])
            assert np.abs(u_plain[k]).max() > 1e-4
        elif k.startswith("encoder/layers/1/"):
            np.testing.assert_array_equal(u_scaled[k], u_plain[k])
        else:
            assert np.all(u_scaled[k] == 0) and np.all(np.signbit(u_scaled[k]))
    # the reference agrees, with frozen leaves out of the clipping norm
    scales = {k: optim.lr_scale_for(k, rules, 0.0) for k in before}
    want = np_reference(params, [_grads(t, params) for t in range(3)], name="lamb", lr=lambda t: 0.01, scales=scales)
    for k in want:
        np.testing.assert_allclose(after[k], want[k], rtol=2e-5, atol=1e-6, err_msg=k)


def test_frozen_have_no_optimizer_state():
    params = _params()
    cfg = optim.OptimizerConfig(lr_scales={"^encoder/layers/1/": 1.0}, default_lr_scale=0.0)
    state = optim.make_optimizer(cfg).init(params)
    n_state = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
    n_train = sum(v.size for k, v in _flat(params).items() if k.startswith("encoder/layers/1/"))
    assert n_state == 2 * n_train  # Adam mu and nu only for the trainable leaves


def test_lr_rules_first_match_and_progressive_helper():
    rules = optim.progressive_lr_rules(2, 0.1)
    assert optim.lr_scale_for("encoder/layers/2/query/kernel", rules, 0.0) == 1.0
    assert optim.lr_scale_for("encoder/layers/0/ffn/0/intermediate/kernel", rules, 0.0) == 0.1
    assert optim.lr_scale_for("encoder/layers/12/query/kernel", rules, 0.0) == 0.0
    assert optim.lr_scale_for("encoder/embeddings/norm/scale", rules, 0.0) == 0.0
    assert optim.lr_scale_for("a/b", [("a", 0.5), ("a/b", 2.0)]) == 0.5
    assert optim.progressive_lr_rules(3, 0.0) == [(r"^encoder/layers/3/", 1.0)]
    with pytest.raises(ValueError, match="bad regex"):
        optim.OptimizerConfig(lr_scales=(("(", 1.0),))


def test_nnx_state_paths_and_freeze():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.query = nnx.Linear(3, 3, rngs=rngs)
            self.norm = nnx.LayerNorm(3, rngs=rngs)

    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([Block(rngs), Block(rngs)])

    state = nnx.state(Tiny(nnx.Rngs(0)), nnx.Param)
    paths = optim.param_paths(state)
    assert "layers/0/query/kernel" in paths and "layers/1/norm/scale" in paths
    assert paths == optim.param_paths(nnx.to_pure_dict(state))
    cfg = optim.OptimizerConfig(lr_scales=(("^layers/1/", 1.0),), default_lr_scale=0.0, learning_rate=0.1)
    tx = optim.make_optimizer(cfg)
    opt_state = tx.init(state)
    grads = jax.tree.map(jnp.ones_like, state)
    updates, opt_state = jax.jit(tx.update)(grads, opt_state, state)
    new = optax.apply_updates(state, updates)
    for k, a, b in zip(paths, jax.tree.leaves(state), jax.tree.leaves(new)):
        assert (np.asarray(a).tobytes() == np.asarray(b).tobytes()) == k.startswith("layers/0/"), k


def test_schedules_key_values():
    pd = optim.make_schedule(
        dict(
            learning_rate=1.5e-3, schedule="warmup_linear", warmup_steps=10_000, total_steps=500_000, end_lr_ratio=1e-4
        )
    )
    for step, want in [
        (0, 0.0),
        (5_000, 0.75e-3),
        (10_000, 1.5e-3),
        (255_000, 1.5e-3 * (1 + 1e-4) / 2),
        (500_000, 1.5e-7),
        (600_000, 1.5e-7),
    ]:
        np.testing.assert_allclose(float(pd(step)), want, rtol=1e-5, atol=1e-12, err_msg=str(step))
    official = optim.make_schedule(
        dict(
            learning_rate=1.5e-3,
            schedule="warmup_linear_official",
            warmup_steps=10_000,
            total_steps=500_000,
            end_lr_ratio=1e-4,
        )
    )
    np.testing.assert_allclose(float(official(5_000)), 0.75e-3, rtol=1e-5)
    np.testing.assert_allclose(float(official(10_000)), 1.5e-3 - (1.5e-3 - 1.5e-7) * 10_000 / 500_000, rtol=1e-5)
    stage = optim.make_schedule(dict(learning_rate=1.5e-3, warmup_steps=100))
    for step, want in [(0, 0.0), (50, 0.75e-3), (100, 1.5e-3), (10_000, 1.5e-3)]:
        np.testing.assert_allclose(float(stage(step)), want, rtol=1e-6, atol=1e-12)
    ft = optim.make_schedule(
        dict(name="adamw", learning_rate=4e-5, schedule="warmup_linear", warmup_fraction=0.1, total_steps=1000)
    )
    for step, want in [(0, 0.0), (50, 2e-5), (100, 4e-5), (550, 2e-5), (1000, 0.0)]:
        np.testing.assert_allclose(float(ft(step)), want, rtol=1e-5, atol=1e-12)


def test_config_errors_and_configdict():
    with pytest.raises(ValueError, match=r"unknown keys \['lr'\]"):
        optim.OptimizerConfig.from_config({"lr": 1e-3})
    with pytest.raises(ValueError, match="needs total_steps"):
        optim.OptimizerConfig(schedule="warmup_linear")
    with pytest.raises(ValueError, match="optimizer.name"):
        optim.OptimizerConfig(name="sgd")
    import ml_collections

    cd = ml_collections.ConfigDict(dict(name="adamw", learning_rate=2e-5, lr_scales=(("^classifier/", 10.0),)))
    cfg = optim.OptimizerConfig.from_config(cd)
    assert cfg.name == "adamw" and cfg.lr_scales == (("^classifier/", 10.0),)


def _linear_problem():
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)
    params = {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "bias": jnp.zeros(2)},
        "frozen": {"kernel": jnp.asarray([[-0.0, 1.5]], jnp.float32)},
    }

    def loss(p, batch):
        bx, by = batch
        pred = bx @ p["dense"]["kernel"] + p["dense"]["bias"] + p["frozen"]["kernel"][0, 1]
        return jnp.mean((pred - by) ** 2)

    return params, (x, y), loss


def test_gradient_accumulation_equals_big_batch():
    params, (x, y), loss = _linear_problem()
    base = dict(name="lamb", learning_rate=0.05, lr_scales={"^frozen/": 0.0})
    big_tx = optim.make_optimizer(base)
    acc_tx = optim.make_optimizer(dict(base, accumulation_steps=4))
    p_big, s_big = params, big_tx.init(params)
    p_acc, s_acc = params, acc_tx.init(params)
    grad = jax.jit(jax.grad(loss))

    @jax.jit
    def big_step(p, s, g):
        u, s = big_tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    @jax.jit
    def acc_step(p, s, g):
        u, s = acc_tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for _ in range(3):
        p_big, s_big = big_step(p_big, s_big, grad(p_big, (x, y)))
        for i in range(4):
            p_acc, s_acc = acc_step(p_acc, s_acc, grad(p_acc, (x[2 * i : 2 * i + 2], y[2 * i : 2 * i + 2])))
    for a, b in zip(jax.tree.leaves(p_big), jax.tree.leaves(p_acc)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(p_acc["dense"]["kernel"], params["dense"]["kernel"])
    assert np.asarray(p_acc["frozen"]["kernel"]).tobytes() == np.asarray(params["frozen"]["kernel"]).tobytes()
    # in-step accumulation with lax.scan gives the big-batch loss and gradient
    v_big, g_big = jax.value_and_grad(loss)(params, (x, y))
    v_acc, g_acc = jax.jit(lambda p, b: steps.accumulate_gradients(jax.value_and_grad(loss), p, b, 4))(params, (x, y))
    np.testing.assert_allclose(v_acc, v_big, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_big), jax.tree.leaves(g_acc)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        steps.accumulate_gradients(jax.value_and_grad(loss), params, (x, y), 3)

    # with_index: micro-batch i (rows i, i+n, ...) is told its index, e.g. for its own dropout key
    def first_row_and_index(p, b, i):
        return b[0][0, 0], i.astype(jnp.float32)

    rows, index = steps.accumulate_gradients(first_row_and_index, params, (x, y), 4, with_index=True)
    np.testing.assert_allclose([rows, index], [np.mean(np.asarray(x)[:4, 0]), 1.5], rtol=1e-6)
    assert float(steps.accumulate_gradients(first_row_and_index, params, (x, y), 1, with_index=True)[1]) == 0.0


def test_skip_nonfinite_keeps_params():
    params, (x, y), loss = _linear_problem()
    tx = optim.make_optimizer(dict(learning_rate=0.05, skip_nonfinite=True))
    state = tx.init(params)
    g = jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), params)
    u, state = tx.update(g, state, params)
    new = optax.apply_updates(params, u)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new)):
        np.testing.assert_array_equal(a, b)
    u, state = tx.update(jax.grad(loss)(params, (x, y)), state, params)
    assert np.all(np.isfinite(jax.tree.leaves(u)[0])) and np.abs(jax.tree.leaves(u)[0]).max() > 0


def test_frozen_gradients_are_dead_code_under_jit():
    # Frozen leaves' gradients feed nothing, so XLA drops their backward matmuls.
    k = jax.random.PRNGKey(0)
    n, b = 128, 16
    p = {"a": {"kernel": jax.random.normal(k, (n, n))}, "b": {"kernel": jax.random.normal(k, (n, n))}}
    x = jax.random.normal(k, (b, n))
    loss = lambda p: jnp.mean(((x @ p["a"]["kernel"]) @ p["b"]["kernel"]) ** 2)

    def flops(rules):
        tx = optim.make_optimizer(dict(lr_scales=rules))

        def step(p, s):
            u, s = tx.update(jax.grad(loss)(p), s, p)
            return optax.apply_updates(p, u), s

        cost = jax.jit(step).lower(p, tx.init(p)).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    matmul = 2 * b * n * n
    assert flops((("^a/", 0.0),)) < flops(()) - 1.8 * matmul  # dW_a and dx through W_b removed
