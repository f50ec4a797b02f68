"""int8 routes on one small trained student, side by side (issue #11): PTP dynamic / static int8, with and without
residual equalisation, weight-only, and QAT -> static int8 with the run's ranges.

    python benchmarks/quantize_compare.py [--workdir=/tmp/qcompare] [--out=benchmarks/results/quantize_compare.json]

The student is MobileBERT-shaped (`test_mobilebert`: NoNorm, bottlenecks) fine-tuned on TFDS mock SST-2 (offline,
random data: the numbers compare the int8 routes on the same weights, they say nothing about accuracy). Each file is
compared with the fp32 JAX model on the same random padded sequences (`--verify`): argmax agreement of the logits,
whole-tensor error, and error per feature channel of the final hidden state; the QAT file also against the run's
fake-quant forward (what it is meant to compute).
"""

import argparse
import json
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "configs"))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="/tmp/qcompare")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "quantize_compare.json"))
    p.add_argument("--examples", type=int, default=64)
    args = p.parse_args()
    import tensorflow_datasets as tfds

    import finetune_glue
    from mobiledistill import export, finetune

    shutil.rmtree(args.workdir, ignore_errors=True)
    t0 = time.time()
    with tfds.testing.mock_data(num_examples=args.examples):
        c = finetune_glue.get_config("task=sst2,tiny=1,seeds=1,init=preset:test_mobilebert")
        c.data.max_train_examples = c.data.max_eval_examples = args.examples
        c.train.epochs = 3
        finetune.run(c, f"{args.workdir}/ft")
        q = finetune_glue.get_config(f"task=sst2,tiny=1,seeds=1,init=finetune:{args.workdir}/ft")
        q.tokenizer = ""
        q.data.max_train_examples = q.data.max_eval_examples = args.examples
        q.qat = finetune.qat_config()
        q.train.epochs = 1
        finetune.run(q, f"{args.workdir}/qat")
    routes = {"dynamic_equalised": ("ft", ["--quantize=dynamic"]),
              "dynamic_plain": ("ft", ["--quantize=dynamic", "--no-equalize"]),
              "static_int8_equalised": ("ft", ["--quantize=int8"]),
              "static_int8_plain": ("ft", ["--quantize=int8", "--no-equalize"]),
              "weight_only": ("ft", ["--quantize=weight_only"]),
              "qat_static_int8": ("qat", ["--quantize=int8"])}
    results = {}
    for name, (run, flags) in routes.items():
        out = f"{args.workdir}/export_{name}"
        rc = export.run([f"--from={args.workdir}/{run}", f"--to={out}", "--format=onnx", "--seq_len=32", "--verify",
                         "--repeats=3", *flags])
        if rc:
            results[name] = {"exit": rc}
            continue
        r = json.load(open(f"{out}/export.json"))
        f = r["verify"]["files"]["model.int8.onnx"]
        h = f["outputs"][export.HIDDEN]["per_channel"]
        results[name] = {"source": run, "flags": flags, "bytes": r["files"]["model.int8.onnx"]["bytes"],
                         "logits_argmax_agreement": f["outputs"]["logits"]["argmax_agreement"],
                         "logits_rel_err": f["outputs"]["logits"]["rel_err"],
                         "hidden_rel_err": f["outputs"][export.HIDDEN]["rel_err"],
                         "hidden_channel_err_max": h["max"], "hidden_channel_err_median": h["median"],
                         "hidden_channels_over_10pct": f"{h['over_10pct']}/{h['channels']}",
                         "latency_ms_batch1": {k: v for k, v in r["verify"]["latency_ms_batch1"].items()
                                               if k.startswith("onnxruntime")},
                         "equalised": r.get("equalization", {}).get("applied", False)}
        if "int8" in r and "vs_qat_forward" in r["int8"]:
            results[name]["vs_qat_fake_quant_forward_output_steps"] = r["int8"]["vs_qat_forward"][
                "max_err_in_output_steps"]
    record = {"model": "test_mobilebert (NoNorm, bottlenecks), fine-tuned 3 epochs on mock SST-2; QAT 1 epoch from it",
              "reference": "fp32 JAX model of each route's source run (the QAT run's float weights for qat_*)",
              "inputs": "8 random padded sequences x 32", "seconds": round(time.time() - t0, 1),
              "cpus": len(os.sched_getaffinity(0)), "load_average_1min": round(os.getloadavg()[0], 2),
              "routes": results}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(record, fh, indent=2)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
