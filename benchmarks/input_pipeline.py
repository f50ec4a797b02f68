"""Input-pipeline throughput: MLM+NSP examples per second on one CPU core, at sequence length 128 and 512.

Corpus: the embedded Python docs; tokenizer: a WordPiece vocab trained on it (asked for 30,522 tokens; the corpus
supports ~11k at min_frequency 2), cached. Two regimes: `tokenize_every_document` (no document cache: every document
is split and tokenised when read and every random-next segment tokenises its sentences: the cost on a corpus far
larger than memory, e.g. Wikipedia) and `cached_documents` (all documents tokenised beforehand: the cost of cutting
and masking examples alone). Each figure is the median of --repeats runs of --examples examples.

    python benchmarks/input_pipeline.py                      # writes benchmarks/results/input_pipeline.json
"""

import os

# One core, no tokenizer thread pool: set before `tokenizers` is imported.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import tokenizers

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, os.path.dirname(HERE))

from mobiledistill.data import PretrainingConfig, PretrainingIterator, embedded_corpus, trained_tokenizer
from mobiledistill.data.rotten_tomatoes import default_cache_dir


def machine() -> dict:
    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu_model,
        "cpus_visible": os.cpu_count(),
        "cores_used": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "tokenizers": tokenizers.__version__,
    }


def throughput(corpus, tok, seq_len: int, examples: int, repeats: int, cache: int, batch: int) -> dict:
    rates = []
    for r in range(repeats):
        it = PretrainingIterator(
            corpus,
            tok,
            global_batch_size=batch,
            config=PretrainingConfig(max_seq_length=seq_len),
            seed=r,
            process_index=0,
            process_count=1,
            document_cache_size=cache,
        )
        if cache:  # the timed part then only cuts and masks
            it.warm_cache()
        n = 0
        t0 = time.perf_counter()
        while n < examples:
            n += len(it.next_numpy()["input_ids"])
        rates.append(n / (time.perf_counter() - t0))
    return {
        "examples_per_s_median": round(statistics.median(rates), 1),
        "examples_per_s_runs": [round(x, 1) for x in rates],
        "tokens_per_s_median": round(statistics.median(rates) * seq_len, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=3000, help="examples per timed run (a third of it at 512)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--vocab_size", type=int, default=30522)
    p.add_argument("--cache_dir", default=os.path.join(default_cache_dir(), "vocab-python-docs-30522"))
    p.add_argument("--out", default=os.path.join(HERE, "results", "input_pipeline.json"))
    args = p.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    t0 = time.perf_counter()
    corpus = embedded_corpus()
    corpus_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tok = trained_tokenizer(corpus.texts(), args.cache_dir, corpus_name=corpus.name, vocab_size=args.vocab_size)
    vocab_s = time.perf_counter() - t0

    results = {}
    for seq_len, n in ((128, args.examples), (512, max(args.batch, args.examples // 3))):
        results[f"seq{seq_len}"] = {
            regime: throughput(corpus, tok, seq_len, n, args.repeats, cache, args.batch)
            for regime, cache in (("tokenize_every_document", 0), ("cached_documents", 2 * len(corpus)))
        }
        print(
            f"seq {seq_len}: "
            + ", ".join(f"{k} {v['examples_per_s_median']:.0f} ex/s" for k, v in results[f"seq{seq_len}"].items()),
            flush=True,
        )

    report = {
        "benchmark": "input_pipeline",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "corpus": {
            "name": corpus.name,
            "documents": len(corpus),
            "bytes": sum(len(d.encode("utf-8")) for d in corpus),
            "build_s": round(corpus_s, 2),
        },
        "tokenizer": {"vocab_size": tok.vocab_size, "source": tok.source, "load_or_train_s": round(vocab_s, 2)},
        "settings": {
            "batch": args.batch,
            "repeats": args.repeats,
            "examples_128": args.examples,
            "examples_512": max(args.batch, args.examples // 3),
            "masked_lm_prob": 0.15,
            "short_seq_prob": 0.1,
            "whole_word_masking": False,
        },
        "results": results,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(args.out), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
