"""Prediction and metrics: jitted head outputs over feature arrays, and their scores (GLUE, SQuAD, custom, PTP)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mobiledistill import evaluate, sharding, steps
from mobiledistill.data import ArrayIterator, GlueTask, glue_task


def _output_keys(kind: str) -> tuple[str, ...]:
    return ("start_logits", "end_logits") if kind == "span" else ("logits",)


def make_predict(graphdef, kind: str):
    keys = _output_keys(kind)

    def predict(params, batch):
        out = steps.forward(nnx.merge(graphdef, params), batch)
        return {k: out[k] for k in keys}

    return jax.jit(predict)


def predict_arrays(predict, params, arrays: Mapping[str, np.ndarray], batch: int, mesh) -> dict[str, np.ndarray]:
    """Head outputs for every row of `arrays`, in order (every host computes all rows)."""
    inputs = {k: arrays[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    it = ArrayIterator(inputs, batch, shuffle=False, drop_remainder=False, num_epochs=1, process_index=0,
                       process_count=1)
    rep = sharding.replicated(mesh)
    chunks: dict[str, list] = {}
    for b in it:
        keep = b.pop("example_mask") > 0
        out = jax.device_get(predict(params, jax.device_put(b, rep)))
        for k, v in out.items():
            chunks.setdefault(k, []).append(np.asarray(v)[keep])
    return {k: np.concatenate(v) for k, v in chunks.items()}


def score(c, kind: str, features, outputs: Mapping[str, np.ndarray], task: GlueTask | None = None
          ) -> tuple[dict, Any, dict]:
    """(metrics in percent, predictions to write, extra write_eval_outputs arguments)."""
    if kind == "span":
        v2 = c.squad_version == "v2.0"
        spans = evaluate.decode_spans(features.eval_columns(), outputs["start_logits"], outputs["end_logits"],
                                      version_2=v2, contexts=features.contexts)
        golds = [ex.gold() for ex in features.examples]
        metrics = evaluate.squad_metrics(spans.predictions, golds, spans.null_odds if v2 else None, version_2=v2)
        metrics["score"] = metrics["f1"]
        extra = dict(nbest=spans.nbest, null_odds=spans.null_odds if v2 else None)
        return metrics, spans.predictions, extra
    logits = outputs["logits"]
    if c.get("ptp") is not None:
        labels = features["labels"]
        logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), -1)
        loss = float(-jnp.mean(jnp.take_along_axis(logp, jnp.asarray(labels)[:, None], -1)))
        acc = 100.0 * float(np.mean(np.argmax(logits, -1) == labels))
        return {"accuracy": acc, "loss": loss, "score": acc}, np.argmax(logits, -1), {}
    task = task or glue_task(c.task)
    preds = logits[:, 0] if task.is_regression else np.argmax(logits, -1)
    if task.custom:
        metrics = evaluate.custom_metrics(logits, features["labels"], task.label_names)
    else:
        metrics = evaluate.glue_metrics(task.name, logits, features["labels"])
    return metrics, preds, dict(label_names=task.label_names)


def _flat_metrics(per_split: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """One split's metrics as they are; several splits as `<split>/<metric>`, each split on its own (never
    averaged: a dev and a test number mean different things)."""
    if len(per_split) == 1:
        return dict(next(iter(per_split.values())))
    return {f"{s}/{k}": v for s, m in per_split.items() for k, v in m.items()}


def _eval_line(metrics: Mapping[str, Mapping[str, float]]) -> str:
    return "; ".join(f"{s}: " + ", ".join(f"{k} {v:.2f}" for k, v in m.items() if isinstance(v, float)
                                          and not k.endswith("thresh"))
                     for s, m in metrics.items())
