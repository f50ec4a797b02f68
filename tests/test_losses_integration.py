"""Losses and optimizer on the real (tiny) encoders: a progressive-transfer step end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mobiledistill import losses as L
from mobiledistill import optim
from mobiledistill.models import Encoder, preset


@pytest.mark.slow
@pytest.mark.parametrize("mask_value", ["min"])
def test_progressive_step_on_real_encoders(mask_value):
    teacher = Encoder(preset("test_ib_bert", attention_mask_value=mask_value), rngs=nnx.Rngs(0))
    student = Encoder(preset("test_mobilebert", attention_mask_value=mask_value), rngs=nnx.Rngs(1))
    ids = jnp.array([[2, 5, 7, 9, 3, 0], [2, 8, 3, 0, 0, 0]], jnp.int32)
    mask = (ids != 0).astype(jnp.int32)
    graphdef, params, rest = nnx.split(student, nnx.Param, ...)
    t_out = teacher(ids, None, mask, num_layers=2)

    def loss_fn(p):
        s_out = nnx.merge(graphdef, p, rest)(ids, None, mask, num_layers=2)
        return L.layer_transfer_loss(t_out, s_out, [1], None, mask)

    cfg = optim.OptimizerConfig(
        learning_rate=1e-3, lr_scales=optim.progressive_lr_rules(1, 0.1, prefix="layers"), default_lr_scale=0.0
    )
    tx = optim.make_optimizer(cfg)

    @jax.jit
    def step(p, s):
        (loss, terms), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss, terms, g

    new, _, loss, terms, grads = step(params, tx.init(params))
    assert np.isfinite(loss) and float(loss) > 0 and set(terms) == {"fmt", "at", "beta", "gamma"}
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    moved = {}
    for path, a, b in zip(optim.param_paths(params), jax.tree.leaves(params), jax.tree.leaves(new)):
        moved[path] = np.asarray(a).tobytes() != np.asarray(b).tobytes()
    assert any(moved[k] for k in moved if k.startswith("layers/1/"))
    assert any(moved[k] for k in moved if k.startswith("layers/0/"))
    assert not any(moved[k] for k in moved if not k.startswith("layers/")), [
        k for k in moved if moved[k] and not k.startswith("layers/")
    ]
    # identical student and teacher give exactly zero transfer loss
    same, _ = L.layer_transfer_loss(t_out, t_out, [0, 1], None, mask)
    assert float(same) == 0.0
