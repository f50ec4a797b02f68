r"""Rotten Tomatoes with the MobileBERT-shaped student distilled from all-MiniLM-L6-v2 (configs/minilm_mobilebert.py).

    python -m mobiledistill.main --config=configs/minilm_mobilebert.py:local --workdir=runs/minilm_mobilebert_local
    python examples/rotten_tomatoes_minilm_mobilebert.py --pipeline runs/minilm_mobilebert_local --out runs/rt_mm

Fine-tunes, on the first `--max_train` Rotten Tomatoes training sentences (split by movie; seq `--seq`, batch 32,
`--seeds` seeds each, every model the read-out `--pooling`):
  teacher     all-MiniLM-L6-v2 fine-tuned (`--teacher_epochs` at lr 1e-4, `--teacher_seeds` seeds; task KD reads seed 0)
  distilled   the pipeline's `pd` student (teacher_head -> progressive transfer -> PD)
  scratch     the pipeline's `scratch` student (the same student, MLM + NSP without a teacher, PD's step budget)
  task_kd     the distilled student fine-tuned from the teacher's logits too (KD at T `--temperature`, T^2, plus
              `--ce_weight` x cross-entropy)
  task_kd_qat task_kd + 1 epoch of int8 quantisation-aware training (`finetune.qat_config()`, lr `--lr` / 10, the
              same KD); `python -m mobiledistill.export --from=OUT/task_kd_qat --to=DIR --format=onnx
              --quantize=int8` writes its int8 file with the run's ranges (mean read-out: no hf format;
              benchmarks/export.py --qat_from compares it with the PTQ routes)
Writes `OUT/evidence.json` and `OUT/evidence.md` (parameters, forward FLOPs per sequence, dev accuracy mean ± std,
the fraction of the teacher's mean accuracy kept) after every model; each run is a resumable fine-tuning workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

import jax  # noqa: E402
from etils import epath  # noqa: E402
from flax import nnx  # noqa: E402
from rotten_tomatoes import base_config, minilm_dir  # noqa: E402

from mobiledistill import evaluate, finetune  # noqa: E402
from mobiledistill.models import Encoder, forward_flops  # noqa: E402

MODELS = ("teacher", "distilled", "scratch", "task_kd", "task_kd_qat")
DESCRIPTIONS = {
    "teacher": "teacher: all-MiniLM-L6-v2 fine-tuned",
    "distilled": "MobileBERT-shaped student, distilled (head -> PKT -> PD)",
    "scratch": "the same student, pre-trained without a teacher (same PD budget)",
    "task_kd": "distilled student + task KD from the teacher",
    "task_kd_qat": "the task-KD student + 1 epoch of int8 QAT (with the same KD)",
}


def config(args, model: str, pipeline: str, teacher_dir: str):
    c = base_config(args, range(args.teacher_seeds if model == "teacher" else args.seeds))
    c.model.classifier_pooling = args.pooling
    if model == "teacher":
        c.init = f"hf:{minilm_dir()}"
        c.train.epochs, c.train.lr = args.teacher_epochs, 1e-4
        return c
    c.init = f"stage:{pipeline}/{'scratch' if model == 'scratch' else 'pd'}"
    c.train.epochs, c.train.lr = args.epochs, args.lr
    if model == "task_kd_qat":  # fake-quant int8 (finetune.qat_config) from the finished task-KD student
        c.init = f"finetune:{os.path.join(os.path.dirname(teacher_dir), 'task_kd')}"
        c.qat = finetune.qat_config()
        c.train.epochs, c.train.lr = 1, args.lr / 10
    if model in ("task_kd", "task_kd_qat"):
        c.distill.teacher = f"finetune:{teacher_dir}"
        c.distill.temperature = args.temperature
        c.distill.t_squared = True
        c.distill.ce_weight = args.ce_weight
    return c


def size(run_dir: str, seq: int) -> tuple[int, float]:
    """(encoder parameters, encoder forward FLOPs per sequence at `seq`) of a finished fine-tuning run."""
    cfg = finetune.read_model_json(epath.Path(run_dir))["encoder"]
    abstract = nnx.eval_shape(lambda: Encoder(cfg, nnx.Rngs(0)))
    params = sum(int(x.size) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    return params, float(forward_flops(cfg, seq, pooler=False))


def write(out: str, args, results: dict) -> None:
    t_mean = results.get("teacher", {}).get("summary", {}).get("mean")
    rows = []
    for m, r in results.items():
        s = r["summary"]
        kept = f"{100 * s['mean'] / t_mean:.1f}%" if t_mean else ""
        rows.append(f"| {DESCRIPTIONS[m]} | {r['parameters'] / 1e6:.2f} M | {r['gflops'] :.2f} | {len(r['per_seed'])} "
                    f"| {s['mean']:.2f} ± {s['std']:.2f} | {kept} | " + ", ".join(f"{a:.2f}" for a in r["per_seed"])
                    + " |")
    md = (f"# Rotten Tomatoes: all-MiniLM-L6-v2 -> MobileBERT-shaped student (seq {args.seq}, "
          f"{args.max_train or 'all'} training sentences, pooling {args.pooling})\n\n"
          "| model | encoder parameters | GFLOPs / sequence | seeds | dev accuracy (%) | of the teacher | per seed |\n"
          "|---|---:|---:|---:|---:|---:|---|\n" + "\n".join(rows) + "\n")
    with open(os.path.join(out, "evidence.json"), "w") as f:
        json.dump(evaluate._jsonable({"results": results, "settings": vars(args)}), f, indent=2)
    with open(os.path.join(out, "evidence.md"), "w") as f:
        f.write(md)
    print("\n" + md + f"\nwrote {out}/evidence.json and evidence.md", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", default="runs/minilm_mobilebert_local",
                   help="a finished configs/minilm_mobilebert.py workdir (its pd and scratch stages)")
    p.add_argument("--out", default="runs/rt_minilm_mobilebert")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--seq", type=int, default=64,
                   help="99.95%% of the Rotten Tomatoes sentences fit in 64 MiniLM tokens (median 26, longest 78)")
    p.add_argument("--teacher_epochs", type=int, default=1)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--ce_weight", type=float, default=0.5)
    p.add_argument("--pooling", default="mean", choices=("mean", "cls"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--teacher_seeds", type=int, default=3,
                   help="1 gives the teacher of examples/rotten_tomatoes_papers.py (copy its OUT/teacher to reuse it)")
    p.add_argument("--max_train", type=int, default=4000, help="use the first n training sentences (0 = all)")
    args = p.parse_args()
    models = args.models.split(",")
    bad = [m for m in models if m not in MODELS]
    if bad:
        sys.exit(f"error: unknown model(s) {bad}; valid: {', '.join(MODELS)}")
    pipeline = os.path.abspath(args.pipeline)
    for stage in ("pd", "scratch"):
        if not os.path.exists(os.path.join(pipeline, stage, "done.json")):
            sys.exit(f"error: --pipeline {pipeline} has no finished stage {stage!r}; run configs/minilm_mobilebert.py "
                     f"there first")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    teacher_dir = os.path.join(out, "teacher")
    if "task_kd_qat" in models and "task_kd" not in models:
        models.insert(0, "task_kd")
    if "task_kd" in models and "teacher" not in models:
        models.insert(0, "teacher")
    results = {}
    for m in MODELS:
        if m not in models:
            continue
        t0 = time.time()
        run_dir = os.path.join(out, m)
        runs = finetune.run(config(args, m, pipeline, teacher_dir), run_dir)
        params, flops = size(run_dir, args.seq)
        results[m] = {"summary": evaluate.summarize_seeds(list(runs.values()))["accuracy"],
                      "per_seed": [runs[s]["accuracy"] for s in sorted(runs)], "parameters": params,
                      "gflops": flops / 1e9, "seconds": time.time() - t0}
        write(out, args, results)


if __name__ == "__main__":
    main()
