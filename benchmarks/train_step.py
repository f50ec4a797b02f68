"""Train-step speed, MFU, compile time and memory of full-size models, and the PyTorch baseline (SPEC §9).

    .venv/bin/python benchmarks/train_step.py                 # all parts, ~6-10 minutes on 2 CPU cores
    .venv/bin/python benchmarks/train_step.py --parts=a,d     # some parts: a b c d e (memory is reported by each)

(a) MobileBERT MLM+NSP train step (AdamW, dropout on), batch 8 x seq 128: ours (jit, fp32) with all 128 positions
    labelled and with 20 gathered predictions, vs transformers' MobileBertForPreTraining in PyTorch eager and
    torch.compile given the same work: all 128 positions labelled (its own loss), and its prediction head on the
    hidden states gathered at the same 20 positions.
(b) Progressive knowledge transfer step at layers k = 0, 11, 23 (IB-BERT_LARGE teacher forward to layer k, student
    MobileBERT to layer k, the paper's losses and LAMB).
(c) Pre-training distillation step (full teacher forward + full student train step), and the frozen teacher's
    forward alone, layers scanned vs unrolled.
(e) Pre-training distillation with the offline teacher (`--top-k` stored teacher logits per masked position read
    from the batch, no teacher forward) vs the online PD step of (c).
(d) Compile time of the 24-layer MobileBERT train step, layers scanned and unrolled, with the optimizer over layer
    stacks vs one update per leaf, and the step times of the four.
Part (a) also profiles our two steps: every dot of the optimised HLO timed alone at its shapes (the matmul floor)
vs the whole step, and PyTorch's time over that floor: the most a step made of XLA's CPU matmuls could gain on it.
In (b), (c) and (e) the student runs its layers scanned (`--teacher-scan` also scans the frozen teacher's; by
default the teacher runs unrolled, as `teacher.scan_layers` defaults: its forward-only compile is small).
Part (a)'s variants, and (c) with (e), are built first and then timed in interleaved rounds (one step of each per
round, the order rotating), so the drift of a shared machine slows them alike; the ratios are of the medians, and
per round in the JSON. Every step reports the median ms over repeats, sequences/s, MFU of the student (3 x forward
FLOPs) and in total (+ the teacher's forward) against the f32 matmul peak measured in the same run (fastest of 15
2048-square matmuls), XLA's compiled memory analysis and the process peak RSS. Writes
benchmarks/results/train_step.json (updated after every measurement).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = os.path.join(ROOT, "benchmarks", "results", "train_step.json")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from mobiledistill import config as config_lib  # noqa: E402
from mobiledistill import perf, steps, teacher_topk  # noqa: E402
from mobiledistill.models import PreTrainingModel, forward_flops, preset  # noqa: E402
from mobiledistill.optim import OptimizerConfig  # noqa: E402
from mobiledistill.strategies import Stage, build_stages  # noqa: E402

B, S, P = 8, 128, 20
MB = 1024.0 ** 2


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch
    import transformers
    return dict(platform=platform.platform(), cpu=cpu, cores=os.cpu_count(), python=platform.python_version(),
                jax=jax.__version__, jax_device=jax.devices()[0].device_kind, torch=torch.__version__,
                torch_threads=torch.get_num_threads(), transformers=transformers.__version__,
                load_average_at_start=os.getloadavg())


def make_batch(vocab: int, predictions: int, seed: int = 0, batch: int = B, seq: int = S) -> dict:
    """A random MLM+NSP batch of `batch` x `seq` tokens with `predictions` masked positions per sequence."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (batch, seq)).astype(np.int32)
    if predictions == seq:
        pos = np.tile(np.arange(seq, dtype=np.int32), (batch, 1))
    else:
        pos = np.sort(np.stack([rng.choice(np.arange(1, seq), predictions, replace=False) for _ in range(batch)]), 1)
    return dict(input_ids=ids, token_type_ids=(np.arange(seq)[None] >= seq // 2).astype(np.int32).repeat(batch, 0),
                attention_mask=np.ones((batch, seq), np.int32), masked_lm_positions=pos.astype(np.int32),
                masked_lm_ids=np.take_along_axis(ids, pos, 1), masked_lm_weights=np.ones(pos.shape, np.float32),
                next_sentence_labels=rng.integers(0, 2, (batch,)).astype(np.int32))


def memory(compiled) -> dict:
    try:
        m = compiled.memory_analysis()
        out = dict(temp_mb=m.temp_size_in_bytes / MB, argument_mb=m.argument_size_in_bytes / MB,
                   output_mb=m.output_size_in_bytes / MB)
        out["total_mb"] = out["temp_mb"] + out["argument_mb"] + out["output_mb"]
        return out
    except Exception as e:  # not every backend implements it
        return {"error": str(e)}


def compile_ours(stage: Stage, cfg, teacher_cfg=None, predictions: int = P, seed: int = 0, batch: int = B,
                 seq: int = S, extra: dict | None = None):
    """(compiled train step, its arguments, compile seconds); `extra` arrays join the batch."""
    graphdef, params = nnx.split(PreTrainingModel(cfg, nnx.Rngs(seed)), nnx.Param)
    t_graphdef = t_params = None
    if teacher_cfg is not None:
        t_graphdef, t_params = nnx.split(PreTrainingModel(teacher_cfg, nnx.Rngs(seed + 1)), nnx.Param)
    tx, step = steps.make_train_step(stage, graphdef, params, t_graphdef)
    opt_state = tx.init(params)
    data = {k: jnp.asarray(v) for k, v in {**make_batch(cfg.vocab_size, predictions, seed, batch, seq),
                                            **(extra or {})}.items()}
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, t_params, data, jax.random.key(0))
    compiled = compiled.compile()
    return compiled, (params, opt_state, t_params, data), time.perf_counter() - t0


def ours_step(stage: Stage, cfg, teacher_cfg=None, predictions: int = P, seed: int = 0, batch: int = B,
              seq: int = S, extra: dict | None = None):
    """(step(): one jitted train step run to completion, returning its metrics; compiled; compile seconds). The
    step carries its parameters and optimizer state from call to call."""
    compiled, (params, opt_state, t_params, data), compile_s = compile_ours(stage, cfg, teacher_cfg, predictions,
                                                                            seed, batch, seq, extra)
    state = dict(params=params, opt_state=opt_state, i=0)
    key = jax.random.key(0)

    def step():
        state["params"], state["opt_state"], metrics = compiled(state["params"], state["opt_state"], t_params, data,
                                                                jax.random.fold_in(key, state["i"]))
        state["i"] += 1
        return jax.block_until_ready(metrics)

    return step, compiled, compile_s


def interleaved(steps_: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each step, timed in rounds (one call of each per round, the order rotating), after one
    untimed call each: a shared machine's drift then slows every variant alike and the ratios hold."""
    for step in steps_.values():
        step()
    names, times = list(steps_), {name: [] for name in steps_}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            steps_[name]()
            times[name].append(time.perf_counter() - t)
    return times


def time_ours(stage: Stage, cfg, teacher_cfg=None, predictions: int = P, repeats: int = 5, seed: int = 0,
              profile_peak: float | None = None, batch: int = B, seq: int = S, extra: dict | None = None) -> dict:
    """Compile and time one jitted train step alone; returns timings, FLOPs and memory (and `profile` against
    `profile_peak` FLOP/s when given)."""
    step, compiled, compile_s = ours_step(stage, cfg, teacher_cfg, predictions, seed, batch, seq, extra)
    times = interleaved({"step": step}, repeats)["step"]
    return ours_result(step, compiled, compile_s, times, profile_peak)


def ours_result(step, compiled, compile_s: float, times: list[float], profile_peak: float | None = None) -> dict:
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    metrics = step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    if not np.isfinite(float(metrics["loss"])):
        raise RuntimeError("non-finite loss")
    # minor page faults of one step: XLA:CPU's temporaries are freshly mapped (and zeroed by the kernel) every step
    out = dict(compile_s=compile_s, times_ms=[1e3 * t for t in times], median_ms=1e3 * statistics.median(times),
               loss=float(metrics["loss"]), memory=memory(compiled), rss_mb=rss_mb(), minor_page_faults=faults)
    if profile_peak:
        out["profile"] = profile(compiled, out["median_ms"], profile_peak)
    return out


DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}


def profile(compiled, step_ms: float, peak: float, top: int = 12) -> dict:
    """Where the step's time goes: every dot of the optimised HLO timed standalone at its own shapes (the matmul
    floor XLA's CPU kernels allow) vs the whole step; the rest is elementwise work, layout copies and reductions."""
    groups: dict = {}
    for d in perf.hlo_dots(compiled.as_text()):
        key = (d["dtype"], d["lhs"], d["rhs"], d["dims"])
        groups.setdefault(key, dict(d, count=0))["count"] += 1
    rows = []
    for (dtype, lhs, rhs, dims), d in groups.items():
        sec = perf.time_dot(lhs, rhs, dims, DTYPES.get(dtype, jnp.float32))
        rows.append(dict(lhs=list(lhs), rhs=list(rhs), contracting=[list(dims[0][0]), list(dims[0][1])],
                         count=d["count"], gflop=d["count"] * d["flops"] / 1e9,
                         ms=1e3 * d["count"] * sec, fraction_of_peak=d["flops"] / sec / peak))
    rows.sort(key=lambda r: -r["ms"])
    dot_ms, dot_gflop = sum(r["ms"] for r in rows), sum(r["gflop"] for r in rows)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    # dot_fraction_of_peak: the MFU the step would reach if it were nothing but its matmuls
    return dict(step_ms=step_ms, dot_shapes=len(rows), dot_instructions=sum(r["count"] for r in rows),
                dot_gflop=dot_gflop, dot_ms_standalone=dot_ms, dot_fraction_of_peak=dot_gflop * 1e12 / dot_ms / peak,
                rest_ms=step_ms - dot_ms, xla_bytes_accessed_gb=float(cost.get("bytes accessed", 0.0)) / 1e9,
                top_dots=rows[:top])


def rates(result: dict, student_flops: float, teacher_flops: float, peak: float) -> dict:
    """sequences/s and MFU from per-sequence FLOPs."""
    sec = result["median_ms"] / 1e3
    return dict(result, sequences_per_s=B / sec, student_gflop_per_step=student_flops * B / 1e9,
                teacher_gflop_per_step=teacher_flops * B / 1e9, mfu_student=student_flops * B / sec / peak,
                mfu_total=(student_flops + teacher_flops) * B / sec / peak)


PROFILED = ("ours_all_positions", "ours_20_predictions")


def mlm_stage(name="mlm_nsp") -> Stage:
    opt = OptimizerConfig(name="adamw", learning_rate=1e-4, warmup_steps=0, total_steps=1000, schedule="constant")
    return Stage(name=name, steps=1, init="fresh", optimizer=opt, dropout=True,
                 losses={"mlm": {"weight": 1.0}, "nsp": {"weight": 1.0}})


def torch_step(cfg, compiled: bool, predictions: int = S):
    """(step(), seconds of its first call) for transformers' MobileBertForPreTraining, AdamW, train mode (dropout
    on): all positions labelled (its own loss), or `predictions` gathered positions per sequence (its prediction
    head on the gathered hidden states, as ours does)."""
    import torch
    import transformers

    from mobiledistill.convert import config_to_hf

    torch.manual_seed(0)
    hf = {k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures", "model_type")}
    model = transformers.MobileBertForPreTraining(transformers.MobileBertConfig(**hf))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b = {k: torch.tensor(v) for k, v in make_batch(cfg.vocab_size, predictions).items()}
    inputs = dict(input_ids=b["input_ids"].long(), token_type_ids=b["token_type_ids"].long(),
                  attention_mask=b["attention_mask"].long())
    if predictions == S:
        fwd = torch.compile(model) if compiled else model
        labels = dict(labels=inputs["input_ids"], next_sentence_label=b["next_sentence_labels"].long())

        def loss_fn():
            return fwd(**inputs, **labels).loss
    else:
        def gathered():
            seq_out, pooled = model.mobilebert(**inputs, return_dict=False)[:2]
            pos = b["masked_lm_positions"].long()
            hidden = torch.gather(seq_out, 1, pos[..., None].expand(-1, -1, seq_out.shape[-1]))
            mlm = model.cls.predictions(hidden)
            nsp = model.cls.seq_relationship(pooled)
            ce = torch.nn.functional.cross_entropy
            return (ce(mlm.reshape(-1, mlm.shape[-1]), b["masked_lm_ids"].reshape(-1).long())
                    + ce(nsp, b["next_sentence_labels"].long()))
        loss_fn = torch.compile(gathered) if compiled else gathered

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return float(loss.detach())

    t0 = time.perf_counter()
    step()
    return step, time.perf_counter() - t0


def teacher_forward(cfg, repeats: int, peak: float) -> dict:
    """The frozen teacher's forward alone (what the PD step runs under `stop_gradient`: MLM logits at the masked
    positions, every hidden state and attention score), layers scanned vs unrolled, interleaved; the two forwards'
    largest output difference is recorded too (the same parameters, so it must be float noise)."""
    batch = {k: jnp.asarray(v) for k, v in make_batch(cfg.vocab_size, P).items()}
    flops = forward_flops(cfg, S, mlm_positions=P, nsp=True) * B
    calls, res, outputs = {}, {}, {}
    for name, scan in (("unrolled", False), ("scanned", True)):
        graphdef, params = nnx.split(PreTrainingModel(cfg.replace(scan_layers=scan), nnx.Rngs(1)), nnx.Param)

        def fwd(params, batch, graphdef=graphdef):
            out = steps.forward(nnx.merge(graphdef, params), batch)
            return out["mlm_logits"], out["hidden_states"], out["attention_scores"]

        t0 = time.perf_counter()
        compiled = jax.jit(fwd).lower(params, batch).compile()
        res[name] = dict(compile_s=time.perf_counter() - t0)
        calls[name] = lambda c=compiled, p=params: jax.block_until_ready(c(p, batch))
        outputs[name] = jax.tree.leaves(calls[name]())
    for name, times in interleaved(calls, repeats).items():
        med = statistics.median(times)
        res[name].update(times_ms=[1e3 * t for t in times], median_ms=1e3 * med, mfu=flops / med / peak)
    res["unrolled_speedup"] = res["scanned"]["median_ms"] / res["unrolled"]["median_ms"]
    res["max_abs_diff"] = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(outputs["unrolled"], outputs["scanned"]))
    return res


def timed(times: list[float], **extra) -> dict:
    return dict(extra, times_ms=[1e3 * t for t in times], median_ms=1e3 * statistics.median(times), rss_mb=rss_mb())


def paper_stages():
    c = config_lib.pretraining_config()
    teacher, student = config_lib.model_config(c.teacher, "float32"), config_lib.model_config(c.student, "float32")
    return teacher, student, {s.name: s for s in build_stages(c, teacher, student)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="a,b,c,d,e")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--teacher-repeats", type=int, default=2)
    ap.add_argument("--top-k", type=int, default=64, help="(e): teacher logits stored per masked position")
    ap.add_argument("--teacher-scan", action="store_true", help="(b, c): the teacher's layers scanned too")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    out = dict(machine=machine(), batch=B, seq_len=S, predictions=P, dtype="float32")
    if os.path.exists(RESULT):  # keep parts that are not re-run
        old = json.load(open(RESULT))
        out.update({k: v for k, v in old.items() if k not in ("machine",) and k[:1] not in parts})
    peak = perf.measured_matmul_peak(2048, repeats=15)
    out["matmul_peak_gflops"] = peak / 1e9

    def save():
        os.makedirs(os.path.dirname(RESULT), exist_ok=True)
        json.dump(out, open(RESULT, "w"), indent=2)

    def show(name, r):
        extra = f" ratio {r['speedup_vs_torch_eager']:.2f}x eager" if "speedup_vs_torch_eager" in r else ""
        print(f"{name}: {r['median_ms']:.0f} ms/step, {r.get('sequences_per_s', B * 1e3 / r['median_ms']):.2f} "
              f"seq/s, MFU student {100 * r.get('mfu_student', float('nan')):.1f}% total "
              f"{100 * r.get('mfu_total', float('nan')):.1f}%{extra}", flush=True)

    student = preset("mobilebert")
    if "a" in parts:
        # Every variant is built first, then all are timed in interleaved rounds (`interleaved`).
        flops = {"all_positions": 3.0 * forward_flops(student, S, mlm_positions=S, nsp=True),
                 "20_predictions": 3.0 * forward_flops(student, S, mlm_positions=P, nsp=True)}
        variants = {  # name: (workload, ours?, build)
            "ours_all_positions": ("all_positions", True, lambda: ours_step(mlm_stage(), student, predictions=S)),
            "ours_20_predictions": ("20_predictions", True, lambda: ours_step(mlm_stage(), student, predictions=P)),
            "ours_20_predictions_scan": ("20_predictions", True,
                                         lambda: ours_step(mlm_stage(), student.replace(scan_layers=True),
                                                           predictions=P)),
            "torch_eager_all_positions": ("all_positions", False, lambda: torch_step(student, False, S)),
            "torch_compile_all_positions": ("all_positions", False, lambda: torch_step(student, True, S)),
            "torch_eager_20_predictions": ("20_predictions", False, lambda: torch_step(student, False, P)),
            "torch_compile_20_predictions": ("20_predictions", False, lambda: torch_step(student, True, P)),
        }
        res, built = {}, {}
        for name, (_, _, build) in variants.items():
            try:
                built[name] = build()
            except Exception as e:  # inductor needs a C++ compiler; record why it is missing
                res[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
        times = interleaved({name: b[0] for name, b in built.items()}, args.repeats)
        for name, b in built.items():
            work, ours, _ = variants[name]
            r = (ours_result(b[0], b[1], b[2], times[name], peak if name in PROFILED else None)
                 if ours else timed(times[name], first_call_s=b[1]))
            res[name] = rates(r, flops[work], 0.0, peak)
        # Each of ours against PyTorch given the same work, per round and as the ratio of medians.
        for name in ("ours_all_positions", "ours_20_predictions", "ours_20_predictions_scan"):
            work, r = variants[name][0], res[name]
            for base, key in ((f"torch_eager_{work}", "eager"), (f"torch_compile_{work}", "compile")):
                if base in times and name in times:
                    r[f"speedup_vs_torch_{key}"] = res[base]["median_ms"] / r["median_ms"]
                    r[f"speedup_vs_torch_{key}_per_round"] = [b / o for b, o in zip(times[base], times[name])]
                    if "profile" in r:  # the ratio if the step took only its matmuls, each at its standalone speed
                        r[f"torch_{key}_over_dot_floor"] = res[base]["median_ms"] / r["profile"]["dot_ms_standalone"]
        out["a_mobilebert_train_step"] = res
        for name, r in res.items():
            if "median_ms" in r:
                show(f"(a) {name}", r)
        for name in PROFILED:
            prof = res[name]["profile"]
            print(f"(a) profile {name}: {prof['dot_instructions']} dots ({prof['dot_gflop']:.0f} GFLOP) take "
                  f"{prof['dot_ms_standalone']:.0f} ms standalone ({100 * prof['dot_fraction_of_peak']:.0f}% of "
                  f"peak) of the {prof['step_ms']:.0f} ms step; PyTorch eager / that floor "
                  f"{res[name].get('torch_eager_over_dot_floor', float('nan')):.2f}x", flush=True)
        del built, variants
        save()

    teacher = tstages = None
    if parts & {"b", "c", "e"}:
        teacher, _, tstages = paper_stages()
        teacher, student_s = teacher.replace(scan_layers=args.teacher_scan), student.replace(scan_layers=True)
        out["stage_steps_layers"] = dict(student="scanned", teacher="scanned" if args.teacher_scan else "unrolled")
    if "b" in parts:
        res = {}
        for k in (0, 11, 23):
            stage = tstages[f"pkt_{k:02d}"]
            sf, tf = perf.stage_flops(stage, student_s, teacher, S, P)
            r = rates(time_ours(stage, student_s, teacher, repeats=args.teacher_repeats), sf, tf, peak)
            res[f"k={k}"] = r
            show(f"(b) progressive k={k}", r)
            out["b_progressive_step"] = res
            save()
    if "c" in parts or "e" in parts:
        # (c) the PD step with its teacher run every step; (e) the same step with the offline teacher: the student
        # reads `--top-k` stored teacher logits per masked position from the batch (mobiledistill/teacher_topk.py).
        # Both are built first and timed in interleaved rounds.
        stage = tstages["pd"]
        sf, tf = perf.stage_flops(stage, student_s, teacher, S, P)
        rng = np.random.default_rng(1)
        extra = dict(teacher_mlm_topk_values=-np.sort(-rng.normal(size=(B, P, args.top_k)), -1).astype(np.float32),
                     teacher_mlm_topk_indices=rng.integers(0, student.vocab_size, (B, P, args.top_k), np.int32))
        off_stage = teacher_topk.offline_stage(dataclasses.replace(stage, teacher_top_k=args.top_k))
        online = ours_step(stage, student_s, teacher)
        offline = ours_step(off_stage, student_s, extra=extra)
        times = interleaved({"online": online[0], "offline": offline[0]}, args.teacher_repeats)
        out["c_pd_step"] = rates(ours_result(*online, times["online"]), sf, tf, peak)
        show("(c) pre-training distillation", out["c_pd_step"])
        res = {"top_k": args.top_k, "offline": rates(ours_result(*offline, times["offline"]), sf, 0.0, peak)}
        res["speedup_offline_vs_online"] = out["c_pd_step"]["median_ms"] / res["offline"]["median_ms"]
        res["speedup_per_round"] = [a / b for a, b in zip(times["online"], times["offline"])]
        res["stored_bytes_per_step"] = int(B * P * args.top_k * 8)
        out["e_pd_offline_teacher"] = res
        show("(e) PD, offline teacher", res["offline"])
        print(f"(e) offline vs online teacher: {res['speedup_offline_vs_online']:.2f}x", flush=True)
        del online, offline
        out["c_teacher_forward"] = tf_res = teacher_forward(teacher, max(args.teacher_repeats, 5), peak)
        print(f"(c) teacher forward alone: unrolled {tf_res['unrolled']['median_ms']:.0f} ms (MFU "
              f"{100 * tf_res['unrolled']['mfu']:.1f}%), scanned {tf_res['scanned']['median_ms']:.0f} ms", flush=True)
        save()
    if "d" in parts:
        res = {}
        # The optimizer over layer stacks (default) against one update per leaf (`stack_layers=False`, the layout
        # before it): the difference is the compile cost of the per-leaf update of 1,119 per-layer parameters.
        per_leaf = dataclasses.replace(mlm_stage(), optimizer=dataclasses.replace(mlm_stage().optimizer,
                                                                                  stack_layers=False))
        for name, scan, stage in (("scanned", True, mlm_stage()), ("unrolled", False, mlm_stage()),
                                  ("scanned_per_leaf", True, per_leaf)):
            cfg = student.replace(scan_layers=scan)
            graphdef, params = nnx.split(nnx.eval_shape(lambda cfg=cfg: PreTrainingModel(cfg, nnx.Rngs(0))),
                                         nnx.Param)
            tx, step = steps.make_train_step(stage, graphdef, params)
            batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in make_batch(cfg.vocab_size, P).items()}
            t0 = time.perf_counter()
            lowered = jax.jit(step).lower(params, jax.eval_shape(tx.init, params), None, batch, jax.random.key(0))
            t1 = time.perf_counter()
            compiled = lowered.compile()
            t2 = time.perf_counter()
            res[name] = dict(trace_lower_s=t1 - t0, compile_s=t2 - t1, total_s=t2 - t0, memory=memory(compiled),
                             hlo_lines=len(compiled.as_text().splitlines()))
            print(f"(d) 24 layers {name}: trace+lower {t1 - t0:.1f} s, compile {t2 - t1:.1f} s", flush=True)
        # The step time of both layouts, scanned and unrolled, interleaved (the stacked view must not cost run time).
        timed_steps = {f"{name}{suffix}": ours_step(stage, student.replace(scan_layers=scan))[0]
                       for name, scan in (("scanned", True), ("unrolled", False))
                       for suffix, stage in (("", mlm_stage()), ("_per_leaf", per_leaf))}
        for name, times in interleaved(timed_steps, args.repeats).items():
            res.setdefault(name, {}).update(step_times_ms=[1e3 * t for t in times],
                                            step_median_ms=1e3 * statistics.median(times))
        for name in ("scanned", "unrolled"):
            ratios = [b / a for a, b in zip(res[name]["step_times_ms"], res[name + "_per_leaf"]["step_times_ms"])]
            res[f"{name}_stacked_vs_per_leaf"] = dict(
                step_speedup=res[name + "_per_leaf"]["step_median_ms"] / res[name]["step_median_ms"],
                step_speedup_per_round=ratios)
            if "total_s" in res[name + "_per_leaf"]:
                res[f"{name}_stacked_vs_per_leaf"]["compile_speedup"] = (res[name + "_per_leaf"]["total_s"]
                                                                         / res[name]["total_s"])
            print(f"(d) {name}, stacked vs per leaf: {res[f'{name}_stacked_vs_per_leaf']}", flush=True)
        del timed_steps
        out["d_compile_24_layers"] = res
        save()
    # MFU above is against the peak measured at the start; a second measurement at the end shows the machine's drift
    out["matmul_peak_end_gflops"] = perf.measured_matmul_peak(2048, repeats=15) / 1e9
    out["peak_rss_mb"] = rss_mb()
    out["machine"]["load_average_at_end"] = os.getloadavg()
    save()
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s; wrote {RESULT}")


if __name__ == "__main__":
    main()
