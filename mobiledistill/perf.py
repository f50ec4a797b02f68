"""FLOPs per step, peak FLOP/s and MFU (SPEC §9), and a per-device memory estimate for the dry run.

MFU = analytic model FLOPs per step / (step time x peak FLOP/s). Training FLOPs are 3 x the forward FLOPs of the
trained model (forward + backward); the frozen teacher's forward is counted separately, so both `mfu_student`
and `mfu_total` are reported.
"""

from __future__ import annotations

import math
import re
import time

import jax
import jax.numpy as jnp

from mobiledistill.models import EncoderConfig, forward_flops
from mobiledistill.strategies.stage import Stage

HEAD_LOSSES = ("mlm", "mlm_distill", "nsp")
# Dense bf16 datasheet rates per JAX device (a TPU v3 chip has two devices, 123 TFLOP/s per chip).
DATASHEET_PEAK = {"TPU v3": 61.5e12, "TPU v4": 137.5e12, "TPU v5 lite": 197e12, "TPU v5": 229.5e12,
                  "H100": 989e12, "H200": 989e12, "A100": 312e12}


def uses_heads(stage: Stage) -> bool:
    return any(spec.get("loss", name) in HEAD_LOSSES for name, spec in stage.losses.items())


def heads_only(stage: Stage) -> bool:
    """Whether only the MLM / NSP heads train (every other parameter's learning-rate scale is 0)."""
    opt = stage.optimizer
    return opt.default_lr_scale == 0 and all(re.match(r"\^(mlm|nsp)/", p) for p, s in opt.lr_scales if s)


def stage_flops(stage: Stage, trained: EncoderConfig, teacher: EncoderConfig | None, seq_len: int,
                predictions: int) -> tuple[float, float]:
    """(trained-model FLOPs, teacher forward FLOPs) per sequence for one step of `stage`."""
    heads = uses_heads(stage)
    kw = dict(mlm_positions=predictions if heads else 0, nsp=heads, pooler=heads)
    student = 3.0 * forward_flops(trained, seq_len, num_layers=stage.num_layers, **kw)
    if heads and heads_only(stage):  # a frozen encoder (MLM-head adaptation): backward through the heads alone
        encoder = forward_flops(trained, seq_len, num_layers=stage.num_layers, pooler=heads)
        student = encoder + (student - 3.0 * encoder)
    teacher_flops = 0.0
    if stage.teacher_from is not None and teacher is not None:
        teacher_flops = float(forward_flops(teacher, seq_len, num_layers=stage.teacher_num_layers, **kw))
    return student, teacher_flops


def measured_matmul_peak(n: int = 1024, dtype=jnp.float32, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul on the default device, fastest of `repeats` (the CPU's practical peak: on a
    shared machine other work only ever slows a run down, so the median understates the peak and inflates MFU)."""
    return 2.0 * n ** 3 / min(_call_times(lambda x: x @ x, (jnp.ones((n, n), dtype),), repeats))


def _call_times(fn, args: tuple, repeats: int) -> list[float]:
    """Seconds of `repeats` calls of jitted `fn(*args)`, after one warm-up call that compiles it."""
    f = jax.jit(fn)
    f(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(*args).block_until_ready()
        times.append(time.perf_counter() - t)
    return times


def peak_flops_per_device() -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    kind = jax.devices()[0].device_kind
    for name, peak in DATASHEET_PEAK.items():
        if name.lower() in kind.lower():
            return peak, f"datasheet {name} bf16"
    return measured_matmul_peak(), f"measured {jax.devices()[0].platform} f32 matmul"


def memory_estimate(stage: Stage, trained: EncoderConfig, teacher: EncoderConfig | None, trained_params: int,
                    trainable_params: int, teacher_params: int, micro_batch_per_device: int, seq_len: int,
                    fsdp: int) -> dict[str, float]:
    """A rough per-device estimate in GiB: parameters (f32), gradients + two optimizer moments for trainable ones
    (split over 'fsdp'), the teacher's parameters, and the activations kept for the backward pass."""
    gib = 1024.0 ** 3
    act_bytes = 2 if trained.dtype == "bfloat16" else 4
    layers = stage.num_layers or len(trained.plan)
    per_token = (4 * trained.hidden_size + 8 * trained.true_hidden_size
                 + 2 * trained.num_feedforward_networks * trained.intermediate_size)
    attention = 3 * trained.num_attention_heads * seq_len
    activations = layers * micro_batch_per_device * seq_len * (per_token * act_bytes + attention * 4)
    out = {
        "params": 4 * trained_params / fsdp / gib,
        "grads_and_optimizer": 12 * trainable_params / fsdp / gib,
        "teacher_params": (4 * teacher_params / fsdp / gib) if stage.teacher_from else 0.0,
        "activations": activations / gib,
    }
    out["total"] = sum(out.values())
    return out


_SHAPE = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]", re.M)
_DOT = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\)(.*)$", re.M)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(",") if d)


def _dims(attrs: str, name: str) -> tuple[int, ...]:
    m = re.search(name + r"=\{([\d,]*)\}", attrs)
    return _ints(m.group(1)) if m else ()


def hlo_dots(hlo_text: str) -> list[dict]:
    """The dot instructions of an optimised HLO module: operand shapes, dimension numbers and FLOPs.

    Used to split a step's time into matmuls and the rest (a dot inside a while loop is listed once).
    """
    shapes = {m.group(1): _ints(m.group(3)) for m in _SHAPE.finditer(hlo_text)}
    dots = []
    for m in _DOT.finditer(hlo_text):
        out = _ints(m.group(3))
        lhs, rhs, attrs = shapes[m.group(4)], shapes[m.group(5)], m.group(6)
        dims = ((_dims(attrs, "lhs_contracting_dims"), _dims(attrs, "rhs_contracting_dims")),
                (_dims(attrs, "lhs_batch_dims"), _dims(attrs, "rhs_batch_dims")))
        flops = 2.0 * math.prod(lhs[d] for d in dims[0][0]) * math.prod(out)
        dots.append(dict(name=m.group(1), dtype=m.group(2), lhs=lhs, rhs=rhs, out=out, dims=dims, flops=flops))
    return dots


def time_dot(lhs: tuple[int, ...], rhs: tuple[int, ...], dims, dtype=jnp.float32, repeats: int = 5) -> float:
    """Median seconds of one standalone `lax.dot_general` with these shapes on the default device."""
    times = _call_times(lambda x, y: jax.lax.dot_general(x, y, dims), (jnp.ones(lhs, dtype), jnp.ones(rhs, dtype)),
                        repeats)
    return sorted(times)[len(times) // 2]
