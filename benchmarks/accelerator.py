r"""Paper-shape stage steps on one accelerator: progressive transfer at k = 0, 11, 23 and PD, fp32 and bf16.

    python benchmarks/accelerator.py                          # a GPU / TPU device: paper shapes, ~10 minutes
    python benchmarks/accelerator.py --batch=8,64 --dtypes=bfloat16
    python benchmarks/accelerator.py --tiny --out=/tmp/a.json # the same code on a CPU with tiny models (tested)

The steps are the pipeline's own (`strategies.build_stages` of the paper config: IB-BERT_LARGE teacher,
MobileBERT student with scanned layers, the frozen teacher unrolled as `teacher.scan_layers` defaults
(`--teacher-scan` scans it too), LAMB), at seq 128 with 20 predictions and `--batch` sequences per device
(the paper's 4096 over 512 TPU v3 cores is 8 per device; larger batches show what one big device sustains).
Per (dtype, batch, stage): median ms/step over `--repeats`, compile time, XLA's compiled memory (temp +
arguments + outputs), and MFU of the student (3 x its forward FLOPs) and in total (+ the teacher's forward)
against the datasheet dense bf16 peak of the device (`perf.DATASHEET_PEAK`: H100 / H200 989 TFLOP/s, TPU v3
61.5 per core; none on a CPU) and against a matmul of the same dtype measured in the same run. Writes
`benchmarks/results/accelerator.json` (or `--out`), updated after every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULT = os.path.join(HERE, "results", "accelerator.json")
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)
# train_step.py defaults JAX to the CPU; here the accelerator is the point (JAX_PLATFORMS=cpu still forces it).
os.environ.setdefault("JAX_PLATFORMS", "")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mobiledistill import config as config_lib  # noqa: E402
from mobiledistill import perf  # noqa: E402
from mobiledistill.strategies import build_stages  # noqa: E402
from train_step import time_ours  # noqa: E402

SEQ, PREDICTIONS = 128, 20  # the paper's pre-training shape; --tiny uses 32 and 5
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def machine() -> dict:
    dev = jax.devices()[0]
    return dict(platform=platform.platform(), python=platform.python_version(), jax=jax.__version__,
                backend=dev.platform, device_kind=dev.device_kind, devices=jax.device_count(),
                datasheet=datasheet_peak())


def datasheet_peak() -> float | None:
    kind = jax.devices()[0].device_kind.lower()
    return next((peak for name, peak in perf.DATASHEET_PEAK.items() if name.lower() in kind), None)


def paper_models(dtype: str, tiny: bool, teacher_scan: bool = False):
    """(teacher, student, {stage name: Stage}) of the paper pipeline; the student's layers scanned, the teacher's
    only with `teacher_scan` (its forward-only compile is small; on the CPU unrolled ran 1.65x faster)."""
    c = config_lib.pretraining_config()
    if tiny:
        c.teacher.preset, c.student.preset = "test_ib_bert", "test_mobilebert"
        c.teacher.num_hidden_layers = c.student.num_hidden_layers = 2
    teacher = config_lib.model_config(c.teacher, dtype).replace(scan_layers=teacher_scan)
    student = config_lib.model_config(c.student, dtype).replace(scan_layers=True)
    return teacher, student, {s.name: s for s in build_stages(c, teacher, student)}


def stage_names(num_layers: int) -> list[str]:
    """PKT at the first, middle and last layer (0, 11, 23 for 24 layers), then PD."""
    ks = sorted({0, num_layers // 2 - 1, num_layers - 1})
    return [f"pkt_{k:02d}" for k in ks] + ["pd"]


def measure(stage, student, teacher, batch: int, repeats: int, peaks: dict, seq: int, predictions: int) -> dict:
    r = time_ours(stage, student, teacher, predictions=predictions, repeats=repeats, batch=batch, seq=seq)
    sf, tf = perf.stage_flops(stage, student, teacher, seq, predictions)
    flop_s = lambda f: f * batch / (r["median_ms"] / 1e3)  # noqa: E731
    out = dict(r, batch=batch, sequences_per_s=batch * 1e3 / r["median_ms"],
               student_tflop_per_step=sf * batch / 1e12, teacher_tflop_per_step=tf * batch / 1e12)
    for name, peak in peaks.items():
        out[f"mfu_student_vs_{name}"] = flop_s(sf) / peak if peak else None
        out[f"mfu_total_vs_{name}"] = flop_s(sf + tf) / peak if peak else None
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batch", default="8,64", help="sequences per device, comma-separated")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--stages", default="", help="comma-separated stage names; default pkt at k = 0, L/2-1, L-1 + pd")
    ap.add_argument("--tiny", action="store_true", help="tiny models (2 layers, seq 32) for a CPU check")
    ap.add_argument("--out", default=RESULT)
    ap.add_argument("--teacher-scan", action="store_true", help="the teacher's layers scanned too")
    args = ap.parse_args(argv)
    dtypes = args.dtypes.split(",")
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        sys.exit(f"error: --dtypes {bad}; valid: {', '.join(DTYPES)}")
    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        sys.exit(f"error: --batch={args.batch!r}; valid: comma-separated positive integers such as 8,64")
    if not batches or min(batches) < 1:
        sys.exit(f"error: --batch={args.batch!r}; valid: comma-separated positive integers such as 8,64")
    seq, predictions = (32, 5) if args.tiny else (SEQ, PREDICTIONS)
    out = dict(machine=machine(), seq_len=seq, predictions=predictions, tiny=args.tiny, results={},
               layers=dict(student="scanned", teacher="scanned" if args.teacher_scan else "unrolled"))
    n = 512 if args.tiny or jax.devices()[0].platform == "cpu" else 8192
    out["matmul_peak_tflops"] = {d: perf.measured_matmul_peak(n, DTYPES[d], repeats=10) / 1e12 for d in dtypes}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".tmp", "w") as f:
            json.dump(out, f, indent=2)
        os.replace(args.out + ".tmp", args.out)

    for dtype in dtypes:
        teacher, student, stages = paper_models(dtype, args.tiny, args.teacher_scan)
        peaks = {"datasheet": datasheet_peak(), "measured": out["matmul_peak_tflops"][dtype] * 1e12}
        names = args.stages.split(",") if args.stages else stage_names(student.num_hidden_layers)
        unknown = [x for x in names if x not in stages]
        if unknown:
            sys.exit(f"error: --stages {unknown}; valid: {', '.join(stages)}")
        for batch in batches:
            for name in names:
                r = measure(stages[name], student, teacher, batch, args.repeats, peaks, seq, predictions)
                out["results"].setdefault(dtype, {}).setdefault(f"batch_{batch}", {})[name] = r
                ds = r["mfu_total_vs_datasheet"]
                print(f"{dtype} batch {batch} {name}: {r['median_ms']:.1f} ms/step (median of {args.repeats}), "
                      f"compile {r['compile_s']:.1f} s, memory {r['memory'].get('total_mb', float('nan')):.0f} MB, "
                      f"MFU total {100 * r['mfu_total_vs_measured']:.1f}% of the measured matmul"
                      + (f", {100 * ds:.1f}% of the datasheet" if ds else ""), flush=True)
                save()
    rows = [r for d in out["results"].values() for b in d.values() for r in b.values()]
    out["median_ms_all"] = statistics.median(r["median_ms"] for r in rows)
    save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
