"""Evaluation, one job a module; `mobiledistill.evaluate` re-exports the public names of all of them.

- `glue`: primitive metrics (accuracy, F1, MCC, Pearson, Spearman; fractions), GLUE per-task metrics and the
  metrics of a custom task (percent).
- `squad`: the official SQuAD v1.1 / v2.0 exact match and F1, with the no-answer threshold sweep.
- `spans`: answer-span decoding across doc-stride windows (n-best, null odds).
- `seeds`: mean ± std over several seeds and the Markdown table of them.
- `outputs`: writing predictions and metrics files (strict JSON, atomic, no silent overwrite).
"""
