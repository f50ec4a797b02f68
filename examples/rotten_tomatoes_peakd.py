r"""Rotten Tomatoes: plain KD vs Pea-KD vs CKD from the cached fine-tuned all-MiniLM-L6-v2 teacher.

    python examples/rotten_tomatoes.py --out runs/rotten_tomatoes            # first: the teacher + plain KD
    python examples/rotten_tomatoes_peakd.py --out runs/rotten_tomatoes      # then this (reuses OUT/teacher)

Same student as examples/rotten_tomatoes.py (3-layer, 128-wide BERT, random init, MiniLM's vocab), same 4,000
training sentences, seq 64, over `--seeds`:
  kd     plain KD (T 2, T^2, + 0.5 CE): the example's `OUT/student_kd` (reused when the settings match).
  peakd  Pea-KD: SPS 'paired' student (3 distinct layers, 6 effective), PTP stage (4-way teacher-derived labels,
         `--ptp_epochs`, seed 0) then PKD (0.3 CE + 0.7 T^2 KL at T 10, the KL averaged over batch x classes as
         the official code) from the PTP encoder. The patience term is
         off: it compares [CLS] states of equal width, and the student is 128-wide vs the teacher's 384.
  ckd    plain KD + CKD's four relation terms (WR/LTR pair + angle, 'emb+skip' matching) with the sst2 weights;
         ckd@S scales the four relation weights by S (e.g. ckd@0.01).
Writes `OUT/compare.json` and `OUT/compare.md` (dev accuracy mean ± std per method).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

from rotten_tomatoes import minilm_dir, student_config  # noqa: E402

from mobiledistill import evaluate, finetune  # noqa: E402
from mobiledistill.losses.relations import ckd_relation_spec, ckd_task_hparams  # noqa: E402
from mobiledistill.strategies.peakd import ptp_thresholds  # noqa: E402


def ptp_then_pkd(ptp, pkd, teacher_dir: str, out: str, extra_losses: dict):
    """Pea-KD on Rotten Tomatoes (SST-2 thresholds): the PTP stage (first seed of `ptp`) on the SPS 'paired'
    student, then PKD (all seeds of `pkd`: 0.3 CE + `extra_losses`) from the PTP encoder; returns {seed: metrics}."""
    ptp.seeds = tuple(ptp.seeds)[:1]
    ptp.sps = "paired"
    t1, t2 = ptp_thresholds("sst2")
    ptp.ptp = ml_collections.ConfigDict({"teacher": f"finetune:{teacher_dir}", "t1": t1, "t2": t2})
    ptp_dir = os.path.join(out, "ptp")
    finetune.run(ptp, ptp_dir)
    pkd.init = f"ptp:{ptp_dir}/seed_0"
    pkd.model = finetune.finetune_config().model  # the architecture (and SPS plan) comes from the PTP encoder
    pkd.sps = "paired"
    pkd.distill.kd_weight = 0.0
    pkd.distill.ce_weight = 0.3
    pkd.distill.extra_losses = ml_collections.ConfigDict(extra_losses)
    return finetune.run(pkd, os.path.join(out, "pkd"))


def peakd(args, model_dir, teacher_dir, out):
    """PTP (seed 0) then PKD (all seeds) on the SPS student, no patience (the widths differ)."""
    ptp = student_config(args, model_dir, None)
    ptp.train.epochs = args.ptp_epochs
    kl = {"weight": 0.7, "temperature": 10.0, "t_squared": True, "reduction": "elementwise_mean"}
    return ptp_then_pkd(ptp, student_config(args, model_dir, teacher_dir), teacher_dir, out, {"kl_kd": kl})


def ckd(args, model_dir, teacher_dir, out, scale=1.0):
    """Plain KD + the four relation terms at `scale` x the official sst2 weights."""
    c = student_config(args, model_dir, teacher_dir)
    hp = ckd_task_hparams("sst2")
    c.distill.extra_losses = ckd_relation_spec(
        {k: scale * hp[k] for k in ("wr_pair", "wr_angle", "ltr_pair", "ltr_angle")})
    return finetune.run(c, out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/rotten_tomatoes")
    p.add_argument("--methods", default="kd,peakd,ckd")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--student", default="small")
    p.add_argument("--student_epochs", type=int, default=3, help="3 reuses OUT/student_kd")
    p.add_argument("--ptp_epochs", type=int, default=1)
    p.add_argument("--student_lr", type=float, default=5e-4)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--ce_weight", type=float, default=0.5)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--max_train", type=int, default=4000)
    args = p.parse_args()
    out = os.path.abspath(args.out)
    teacher_dir = os.path.join(out, "teacher")
    if not os.path.exists(os.path.join(teacher_dir, "summary.json")):
        sys.exit(f"error: no finished teacher in {teacher_dir}; run examples/rotten_tomatoes.py first")
    model_dir = minilm_dir()
    t0 = time.time()
    results, times = {}, {}
    for m in args.methods.split(","):
        t = time.time()
        if m == "kd":
            kd_dir = "student_kd" if args.student_epochs == 3 else f"student_kd_e{args.student_epochs}"
            runs = finetune.run(student_config(args, model_dir, teacher_dir), os.path.join(out, kd_dir))
        elif m == "peakd":
            runs = peakd(args, model_dir, teacher_dir, os.path.join(out, f"student_peakd_e{args.student_epochs}"))
        elif m.startswith("ckd"):  # ckd = the official sst2 weights; ckd@0.01 = relation weights x 0.01
            scale = float(m.split("@", 1)[1]) if "@" in m else 1.0
            name = f"student_ckd_e{args.student_epochs}" + (f"_x{scale:g}" if scale != 1.0 else "")
            runs = ckd(args, model_dir, teacher_dir, os.path.join(out, name), scale)
        else:
            sys.exit(f"error: unknown method {m!r}; valid: kd, peakd, ckd, ckd@<relation weight scale>")
        results[m] = {"summary": evaluate.summarize_seeds(list(runs.values()))["accuracy"],
                      "per_seed": [runs[s]["accuracy"] for s in sorted(runs)]}
        times[m] = time.time() - t
        s = results[m]["summary"]
        print(f"{m}: {s['mean']:.2f} ± {s['std']:.2f} ({times[m]:.0f} s)", flush=True)
        write(out, args, results, times)


def write(out, args, results, times):
    """OUT/compare.json and compare.md, after every method (a partial run leaves its numbers)."""
    md = ("| method | seeds | dev accuracy (%) |\n|---|---:|---:|\n"
          + "".join(f"| {m} | {len(r['per_seed'])} | {r['summary']['mean']:.2f} ± {r['summary']['std']:.2f} |\n"
                    for m, r in results.items()))
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump(evaluate._jsonable({"results": results, "seconds": times, "settings": vars(args)}), f, indent=2)
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(f"# Rotten Tomatoes: KD vs Pea-KD vs CKD (seq {args.seq})\n\n{md}")
    print("\n" + md + f"\nwrote {out}/compare.json and compare.md", flush=True)


if __name__ == "__main__":
    main()
