"""Model card: parameters and forward FLOPs of every preset, and a timed forward pass of one.

    python -m mobiledistill.models [--preset mobilebert] [--batch 1] [--seq 128]
"""

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from mobiledistill.models import PRESETS, Encoder, encoder_param_count, forward_flops, preset


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mobilebert", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args(argv)

    print(f"{'preset':24s} {'parameters':>14s} {'GFLOPs@128':>11s}")
    for name in PRESETS:
        cfg = preset(name)
        print(f"{name:24s} {encoder_param_count(cfg):14,d} {forward_flops(cfg, 128, pooler=False) / 1e9:11.2f}")

    cfg = preset(args.preset)
    graphdef, state = nnx.split(Encoder(cfg, nnx.Rngs(0)))
    forward = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids).sequence_output)
    ids = jax.random.randint(jax.random.key(0), (args.batch, args.seq), 1, cfg.vocab_size)
    out = forward(state, ids).block_until_ready()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        forward(state, ids).block_until_ready()
        times.append(time.perf_counter() - t)
    ms = sorted(times)[len(times) // 2] * 1e3
    gflops = forward_flops(cfg, args.seq) * args.batch / 1e9
    print(f"\n{args.preset}: forward {tuple(ids.shape)} -> {tuple(out.shape)}, finite={bool(jnp.isfinite(out).all())}, "
          f"median {ms:.1f} ms = {gflops / ms * 1e3:.1f} GFLOP/s ({jax.devices()[0].platform})")


if __name__ == "__main__":
    main()
