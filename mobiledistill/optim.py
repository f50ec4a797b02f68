"""Optimizers from optax pieces: LAMB / AdamW, schedules, per-parameter LR scales, freezing,
weight-decay / trust-ratio masks and gradient accumulation (`MultiSteps`; the in-step form is
`steps.accumulate_gradients`).

`make_optimizer(cfg)` builds the whole thing from an `OptimizerConfig` (or a dict /
ml_collections ConfigDict with the same fields):

    over_layer_stacks(  # optim_stack: trainable per-layer leaves updated as [L, ...] arrays
      partition(
        train:  [MultiSteps | apply_if_finite] ( clip_by_global_norm -> LAMB/AdamW core
                -> scale_by_learning_rate(schedule) -> x per-parameter LR scale ),
        frozen: freeze()  # LR scale 0: updates of exactly -0.0, parameters bit-identical
      )
    )

Parameter paths are '/'-joined strings (`encoder/layers/3/query/kernel`, see `path_to_str`).
Biases (last component 'bias') and norm parameters (a component containing 'norm') get neither
weight decay nor the LAMB trust ratio, as in the official MobileBERT/BERT optimizers.
Frozen parameters have no optimizer state and do not enter the clipping norm; under `jax.jit`
their gradients are dead code that XLA removes.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mobiledistill import optim_stack, sharding
from mobiledistill.tree_paths import param_paths, path_to_str  # noqa: F401 (optim.path_to_str)

# ---------------------------------------------------------------------------------------------
# Parameter paths ('/'-joined strings, `tree_paths`)


def is_bias_or_norm(path: str) -> bool:
    """True for biases (last component 'bias') and norm parameters (a component has 'norm')."""
    parts = path.split("/")
    return parts[-1] == "bias" or any("norm" in p.lower() for p in parts)


def _map_paths(fn: Callable[[str], Any], tree: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda p, _: fn(path_to_str(p)), tree)


def decay_mask(params: Any) -> Any:
    """Bool tree: True where weight decay (and the LAMB trust ratio) apply."""
    return _map_paths(lambda s: not is_bias_or_norm(s), params)


# ---------------------------------------------------------------------------------------------
# Per-parameter learning-rate scales

Rules = Sequence[tuple[str, float]]


def _compile_rules(rules: Rules | Mapping[str, float]) -> list[tuple[re.Pattern, float]]:
    items = rules.items() if isinstance(rules, Mapping) else rules
    out = []
    for item in items:
        pattern, scale = item
        try:
            out.append((re.compile(pattern), float(scale)))
        except re.error as e:
            raise ValueError(f"lr_scales: bad regex {pattern!r}: {e}") from None
    return out


def lr_scale_for(path: str, rules: Rules | Mapping[str, float], default: float = 1.0) -> float:
    """Scale of the first rule whose regex `re.search`es `path`, else `default`.

    Anchor patterns as needed: 'encoder/layers/1/' does not match layer 10's parameters, while
    'encoder/layers/1' would.
    """
    return _first_match(_compile_rules(rules), default, path)


def _first_match(compiled, default: float, path: str) -> float:
    return next((s for pattern, s in compiled if pattern.search(path)), float(default))


def _scale(compiled, default: float, path: str, leaf) -> float | np.ndarray:
    """The path's LR scale. A layer-stacked path (`encoder/layers/*/...`, `optim_stack`) gets one scale per layer of
    its leading axis: a float when they are all equal, else a float32 vector."""
    if optim_stack.layer_path(path, 0) is None:
        return _first_match(compiled, default, path)
    scales = [_first_match(compiled, default, optim_stack.layer_path(path, n)) for n in range(leaf.shape[0])]
    return scales[0] if len(set(scales)) == 1 else np.asarray(scales, np.float32)


def lr_scale_tree(params: Any, rules: Rules | Mapping[str, float], default: float = 1.0) -> Any:
    """Tree of per-parameter LR scales (0 = frozen); a vector per layer for layer-stacked leaves."""
    compiled = _compile_rules(rules)
    return jax.tree_util.tree_map_with_path(lambda p, x: _scale(compiled, default, path_to_str(p), x), params)


def trainable_mask(params: Any, rules: Rules | Mapping[str, float], default: float = 1.0) -> Any:
    """Bool tree: False where the LR scale is 0 (for filtering what a train step differentiates)."""
    return jax.tree.map(lambda s: bool(np.all(s != 0.0)), lr_scale_tree(params, rules, default))


def progressive_lr_rules(
    layer: int, lower_scale: float = 0.1, prefix: str = "encoder/layers"
) -> list[tuple[str, float]]:
    """Rules for progressive-transfer stage `layer`: encoder layers below at `lower_scale`, the
    active layer at 1.0; use with `default_lr_scale=0` so everything else stays frozen.
    `prefix` is the path of the layer list (`layers` for a bare Encoder's state)."""
    rules = [(rf"^{prefix}/{layer}/", 1.0)]
    if layer > 0 and lower_scale != 0:
        lower = "|".join(str(i) for i in range(layer))
        rules.append((rf"^{prefix}/({lower})/", float(lower_scale)))
    return rules


def scale_by_lr_rules(rules: Rules | Mapping[str, float], default: float = 1.0) -> optax.GradientTransformation:
    """Multiplies each update by its path's LR scale (scale 1 leaves it untouched; per layer for stacked leaves)."""
    compiled = _compile_rules(rules)

    def update_fn(updates, state, params=None):
        del params

        def one(path, u):
            s = _scale(compiled, default, path_to_str(path), u)
            if isinstance(s, float):
                return u if s == 1.0 else u * jnp.asarray(s, u.dtype)
            return u * jnp.asarray(s, u.dtype).reshape((-1,) + (1,) * (u.ndim - 1))

        return jax.tree_util.tree_map_with_path(one, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def freeze() -> optax.GradientTransformation:
    """Updates of exactly -0.0 regardless of the gradient.

    IEEE: p + (-0.0) == p bit for bit for every p, so `optax.apply_updates` leaves frozen
    parameters bit-identical (`optax.set_to_zero()`'s +0.0 turns a -0.0 parameter into +0.0).
    """

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda u: jnp.full_like(u, -0.0), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


# ---------------------------------------------------------------------------------------------
# Optimizer cores


def scale_by_trust_ratio() -> optax.GradientTransformation:
    """`optax.scale_by_trust_ratio()` (||p|| / ||u||, 1 when either is 0), per layer for layer-stacked leaves."""

    def update_fn(updates, state, params):
        def one(path, u, p):
            stacked = optim_stack.layer_path(path_to_str(path), 0) is not None
            axes = tuple(range(1, u.ndim)) if stacked else None
            p_norm = jnp.sqrt(jnp.sum(jnp.square(p), axis=axes, keepdims=stacked))
            u_norm = jnp.sqrt(jnp.sum(jnp.square(u), axis=axes, keepdims=stacked))
            ratio = jnp.where((p_norm == 0.0) | (u_norm == 0.0), jnp.ones_like(p_norm), p_norm / u_norm)
            return u * ratio.astype(u.dtype)

        return jax.tree_util.tree_map_with_path(one, updates, params), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def scale_by_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6, bias_correction: bool = True
) -> optax.GradientTransformation:
    """Adam moments, m_hat / (sqrt(v_hat) + eps). `bias_correction=False` is the official TF
    BERT/MobileBERT form m / (sqrt(v) + eps) (state layout identical to optax's)."""
    if bias_correction:
        return optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

    def init_fn(params):
        zeros = jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=jax.tree.map(jnp.copy, zeros))

    def update_fn(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        new = jax.tree.map(lambda m, v, u: (m / (jnp.sqrt(v) + eps)).astype(u.dtype), mu, nu, updates)
        return new, optax.ScaleByAdamState(count=optax.safe_increment(state.count), mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def lamb(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.01,
    bias_correction: bool = True,
    mask: Any = decay_mask,
) -> optax.GradientTransformation:
    """LAMB: Adam direction + decoupled weight decay, times the trust ratio ||p|| / ||update||
    (1 when either norm is 0), times the learning rate. `mask` (tree or callable, True = apply)
    selects the leaves that get weight decay AND the trust ratio; the others get plain Adam."""
    return optax.chain(
        scale_by_adam(b1, b2, eps, bias_correction),
        optax.add_decayed_weights(weight_decay, mask),
        optax.masked(scale_by_trust_ratio(), mask),  # un-masked leaves pass through
        optax.scale_by_learning_rate(learning_rate),
    )


def adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.01,
    bias_correction: bool = True,
    mask: Any = decay_mask,
) -> optax.GradientTransformation:
    """AdamW (decoupled decay, lr * (adam + wd * p)) with decay only where `mask` is True."""
    return optax.chain(
        scale_by_adam(b1, b2, eps, bias_correction),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


# ---------------------------------------------------------------------------------------------
# Schedules (evaluated at the optimizer's update count, starting at 0)


def warmup_linear_schedule(peak: float, warmup_steps: int, total_steps: int, end_ratio: float = 0.0) -> optax.Schedule:
    """0 -> peak linearly over `warmup_steps`, then linearly to `end_ratio * peak` at
    `total_steps`, constant after. PD: (1.5e-3, 10_000, 500_000, 1e-4); fine-tuning: end 0."""
    decay = optax.linear_schedule(peak, peak * end_ratio, max(total_steps - warmup_steps, 1))
    if warmup_steps <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), decay], [warmup_steps])


def warmup_linear_official_schedule(
    peak: float, warmup_steps: int, total_steps: int, end_ratio: float = 0.0
) -> optax.Schedule:
    """TF BERT/MobileBERT `create_optimizer`: the linear decay runs from step 0 (peak) to
    `total_steps` and the warm-up `peak * step / warmup_steps` overrides it before `warmup_steps`
    (so the peak itself is never reached: lr(W) = peak * (1 - (1 - end_ratio) * W / total))."""
    decay = optax.linear_schedule(peak, peak * end_ratio, max(total_steps, 1))

    def schedule(step):
        warm = peak * jnp.asarray(step, jnp.float32) / max(warmup_steps, 1)
        return jnp.where(step < warmup_steps, warm, decay(step))

    return schedule


def constant_schedule(peak: float, warmup_steps: int = 0) -> optax.Schedule:
    """Constant `peak`, optionally after a linear warm-up from 0 (progressive stages: a fresh
    optimizer per stage restarts the warm-up)."""
    if warmup_steps <= 0:
        return optax.constant_schedule(peak)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup_steps), optax.constant_schedule(peak)], [warmup_steps]
    )


# ---------------------------------------------------------------------------------------------
# Config and builder

OPTIMIZERS = ("lamb", "adamw")
SCHEDULES = ("constant", "warmup_linear", "warmup_linear_official")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Everything `make_optimizer` needs. Fields:

    name: 'lamb' | 'adamw'.  learning_rate: peak LR.
    schedule: 'constant' (after `warmup_steps` linear warm-up), 'warmup_linear' (warm-up, then
      linear to end_lr_ratio * peak at total_steps), 'warmup_linear_official' (TF BERT form).
    warmup_steps, warmup_fraction: warm-up length; a fraction > 0 wins: int(fraction * total_steps)
      (fine-tuning uses 0.1).  total_steps: optimizer updates of the stage.  end_lr_ratio: PD 1e-4.
    b1, b2, eps, weight_decay: 0.9, 0.999, 1e-6, 0.01 (no decay/trust ratio on biases and norms).
    clip_norm: global-norm clipping of the trainable gradients (None or 0 = off).
    bias_correction: Adam bias correction (optax); False = official TF LAMB/AdamW.
    lr_scales: ordered (regex, scale) rules on parameter paths, first match wins; a dict keeps
      insertion order. default_lr_scale: scale of unmatched parameters. Scale 0 = frozen.
    accumulation_steps: micro-batches per update (optax.MultiSteps, mean of the gradients); the
      schedule counts updates, not micro-batches.
    skip_nonfinite: skip updates (micro-steps with accumulation) whose gradients have NaN/Inf.
    stack_layers: update the per-layer parameters as layer-stacked arrays (`optim_stack`: the same numbers, a
      fraction of the compile time); False = one update per leaf (the optimizer state's layout differs).
    """

    name: str = "lamb"
    learning_rate: float = 1.5e-3
    schedule: str = "constant"
    warmup_steps: int = 0
    warmup_fraction: float = 0.0
    total_steps: int = 0
    end_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-6
    weight_decay: float = 0.01
    clip_norm: float | None = 1.0
    bias_correction: bool = True
    lr_scales: tuple[tuple[str, float], ...] = ()
    default_lr_scale: float = 1.0
    accumulation_steps: int = 1
    skip_nonfinite: bool = False
    stack_layers: bool = True

    def __post_init__(self):
        rules = self.lr_scales.items() if isinstance(self.lr_scales, Mapping) else self.lr_scales
        object.__setattr__(self, "lr_scales", tuple((str(p), float(s)) for p, s in rules))
        _compile_rules(self.lr_scales)
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer.name={self.name!r}; valid: {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optimizer.schedule={self.schedule!r}; valid: {SCHEDULES}")
        if self.schedule != "constant" and self.total_steps <= 0:
            raise ValueError(
                f"optimizer.total_steps={self.total_steps}: schedule {self.schedule!r} needs total_steps > 0"
            )
        if not 0.0 <= self.warmup_fraction < 1.0 or self.warmup_steps < 0:
            raise ValueError(
                f"optimizer: warmup_steps={self.warmup_steps}, warmup_fraction="
                f"{self.warmup_fraction}; need steps >= 0 and 0 <= fraction < 1"
            )
        if self.accumulation_steps < 1:
            raise ValueError(f"optimizer.accumulation_steps={self.accumulation_steps}; need >= 1")

    @property
    def effective_warmup_steps(self) -> int:
        if self.warmup_fraction > 0:
            return int(self.warmup_fraction * self.total_steps)
        return int(self.warmup_steps)

    @classmethod
    def from_config(cls, cfg: Any) -> "OptimizerConfig":
        """Accepts an OptimizerConfig, a mapping or an ml_collections ConfigDict; unknown keys are
        an error that names them and lists the valid ones."""
        if isinstance(cfg, cls):
            return cfg
        if hasattr(cfg, "to_dict"):
            cfg = cfg.to_dict()
        cfg = dict(cfg)
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - valid)
        if unknown:
            raise ValueError(f"optimizer config: unknown keys {unknown}; valid: {sorted(valid)}")
        return cls(**cfg)


def make_schedule(cfg: Any) -> optax.Schedule:
    cfg = OptimizerConfig.from_config(cfg)
    warmup = cfg.effective_warmup_steps
    if cfg.schedule == "constant":
        return constant_schedule(cfg.learning_rate, warmup)
    fn = warmup_linear_schedule if cfg.schedule == "warmup_linear" else warmup_linear_official_schedule
    return fn(cfg.learning_rate, warmup, cfg.total_steps, cfg.end_lr_ratio)


def make_optimizer(cfg: Any) -> optax.GradientTransformation:
    """Builds the optimizer described by `cfg` (see `OptimizerConfig`); module docstring has the
    structure. Works on any parameter pytree (nested dicts, `nnx.State`)."""
    cfg = OptimizerConfig.from_config(cfg)
    tx, stackable = stacked_parts(cfg)
    return optim_stack.over_layer_stacks(tx, stackable) if cfg.stack_layers else tx


def stacked_parts(cfg: Any) -> tuple[optax.GradientTransformation, Callable[[str], bool]]:
    """(the optimizer on `optim_stack.to_view` trees, which per-layer paths it stacks: the trainable ones). A train
    step that differentiates the stacked view itself (`steps.make_train_step`) uses these directly."""
    cfg = OptimizerConfig.from_config(cfg)
    core = (lamb if cfg.name == "lamb" else adamw)(
        make_schedule(cfg), cfg.b1, cfg.b2, cfg.eps, cfg.weight_decay, cfg.bias_correction
    )
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
    parts += [core, scale_by_lr_rules(cfg.lr_scales, cfg.default_lr_scale)]
    train = optax.chain(*parts)
    if cfg.accumulation_steps > 1:
        skip = optax.skip_not_finite if cfg.skip_nonfinite else None
        train = optax.MultiSteps(train, cfg.accumulation_steps, should_skip_update_fn=skip).gradient_transformation()
    elif cfg.skip_nonfinite:
        train = optax.apply_if_finite(train, max_consecutive_errors=2**30)

    def labels(params):
        scales = lr_scale_tree(params, cfg.lr_scales, cfg.default_lr_scale)
        return jax.tree.map(lambda s: "frozen" if isinstance(s, float) and s == 0.0 else "train", scales)

    compiled = _compile_rules(cfg.lr_scales)
    return (optax.partition({"train": train, "frozen": freeze()}, labels),
            lambda path: _first_match(compiled, cfg.default_lr_scale, path) != 0.0)


def per_leaf_reader(cfg, params_like, stacked_like, mesh):
    """A function returning (abstract per-leaf optimizer state, converter), for a checkpoint written with
    `stack_layers=False` or before layer stacks existed: `StageCheckpoints.restore_latest(..., opt_state_fallback=...)`
    calls it only when the stacked layout does not match (building the abstract state takes ~1 s for 24 layers),
    reads the state and converts it to the stacked layout of `stacked_like` (on its shardings). None when `cfg` does
    not stack."""
    cfg = OptimizerConfig.from_config(cfg)
    if not cfg.stack_layers:
        return None

    def reader():
        abstract = jax.eval_shape(make_optimizer(dataclasses.replace(cfg, stack_layers=False)).init, params_like)
        like = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                            sharding.tree_shardings(abstract, mesh))
        out_shardings = jax.tree.map(lambda x: x.sharding, stacked_like)
        return like, lambda state: jax.device_put(optim_stack.convert_state(state, stacked_like), out_shardings)

    return reader
