"""Fine-tuning and task-specific distillation on GLUE / SQuAD (SPEC §4 "Fine-tuning", CKD task-specific).

`run(c, workdir)` builds the task model (SequenceClassificationModel or SpanModel) from `c.init`:

    hf:<dir>                    a transformers BERT/MobileBERT directory (encoder copied, head initialised)
    stage:<workdir>/<stage>     the encoder of a finished stage of a pre-training pipeline workdir
    preset:<name>               random initialisation (e.g. 'test_bert'; `c.model.*` fields override the preset)
    ptp:<workdir>[/seed_<s>]    the best-dev-loss encoder of a finished Pea-KD PTP run of this runner

Pea-KD hooks (configs/peakd.py; absent from plain configs): `c.sps` ('paired' or 'top3') runs the encoder with a
Shuffled Parameter Sharing plan; `c.ptp` ({teacher, t1, t2}) replaces the task labels of every split by the 4-way PTP
labels of that teacher's predictions, scores the dev split(s) by accuracy and loss, and keeps the encoder of the
best-dev-loss epoch in `seed_<s>/best_encoder.npz`.

and trains it with AdamW (weight decay 0.01, eps 1e-6, clip 1.0, 10% warm-up, linear decay) for `c.train.epochs`
epochs, evaluating on the dev split(s) after each epoch, once per seed in `c.seeds`. With `c.distill.teacher` set
(`hf:<dir>` of a fine-tuned transformers classifier, or `finetune:<workdir>[/seed_<s>]` of a finished run of this
runner) the loss is the teacher's logit KD at `temperature` (+ `ce_weight` x the task loss, + any registry terms in
`c.distill.extra_losses`, e.g. CKD relations or patience). KD-only teachers are run once over the training set and
their logits cached in the workdir (`teacher_logits.npz`).

Tasks with the user's own labels (`c.task='custom'`, `c.custom`): local TSV/CSV/JSONL files, any number of
classes named by the training file's label values (or `custom.labels`), one text column or a pair, or regression
(`custom.regression`); scored by accuracy and macro-F1 (Pearson/Spearman), predictions written as label names.

Every check (config, data, labels, teacher, init, tokenizer) runs before anything is written to the workdir, so a
refused command leaves it as it was and the corrected command starts cleanly.

Workdir layout:
    config.json, fingerprint        the experiment (re-running resumes; another config is refused)
    model.json                      task, encoder config, labels, tokenizer: makes the workdir a teacher source
    tokenizer/                      when `c.tokenizer='train'`
    seed_<s>/                       Orbax checkpoints (params, optimizer, data iterator), metrics.jsonl, eval.jsonl,
                                    tb/, done.json, <split>_predictions.tsv|json, <split>_metrics.json
    report.md, summary.json         mean ± std over seeds

Modules, one job each (this package re-exports their names; inside it, modules import each other directly):
    config      finetune_config, the `get_config(arg)` keys (parse_arg, apply_arg, tiny), validate
    losses      the span / cached-teacher loss terms (registered on import) and `loss_spec`
    taskdata    raw examples of every split and their features (TaskData)
    sources     the task model, its encoder source (`c.init`), teachers, finished runs (model.json)
    predict     jitted predictions over feature arrays and their scores
    context     `prepare`: every check before the workdir is written (Context)
    training    one seed: initial parameters, cached teacher logits, the training loop, evaluation
    report      report.md and summary.json
    runner      `run`, `evaluate_run`, `finished`
    qat         quantisation-aware fine-tuning (`c.qat = qat_config()`; `init='finetune:<run>'` starts from a
                fine-tuned run): fake-quant Linears, calibrated ranges, `seed_<s>/qat_ranges.json`
"""

from mobiledistill.finetune.config import (
    ARG_KEYS,
    SQUAD,
    apply_arg,
    finetune_config,
    label_names_of,
    parse_arg,
    tiny,
    validate,
)
from mobiledistill.finetune.context import Context, prepare, resolve_tokenizer
from mobiledistill.finetune.losses import LOGIT_ONLY_TERMS, loss_spec
from mobiledistill.finetune.predict import make_predict, predict_arrays, score
from mobiledistill.finetune.qat import qat_config
from mobiledistill.finetune.report import run_label, write_report
from mobiledistill.finetune.runner import evaluate_run, finished, run
from mobiledistill.finetune.sources import (
    COPY_SETTABLE,
    EncoderSource,
    Teacher,
    copy_matching,
    encoder_source,
    finished_run_dir,
    load_finetuned,
    load_teacher,
    model_overrides,
    new_task_model,
    preset_config,
    read_model_json,
    truncated,
)
from mobiledistill.finetune.taskdata import TaskData, build_features, load_examples, task_texts
from mobiledistill.finetune.training import evaluate_params, initial_params, teacher_outputs, train_seed, write_outputs

# Private helpers used elsewhere as finetune.<name> (export, tests).
from mobiledistill.finetune.config import _names  # noqa: F401
from mobiledistill.finetune.runner import _fingerprint_config  # noqa: F401
from mobiledistill.finetune.sources import _as_state  # noqa: F401

__all__ = [
    "ARG_KEYS",
    "COPY_SETTABLE",
    "Context",
    "EncoderSource",
    "LOGIT_ONLY_TERMS",
    "SQUAD",
    "TaskData",
    "Teacher",
    "apply_arg",
    "build_features",
    "copy_matching",
    "encoder_source",
    "evaluate_params",
    "evaluate_run",
    "finetune_config",
    "finished",
    "finished_run_dir",
    "initial_params",
    "label_names_of",
    "load_examples",
    "load_finetuned",
    "load_teacher",
    "loss_spec",
    "make_predict",
    "model_overrides",
    "new_task_model",
    "parse_arg",
    "predict_arrays",
    "prepare",
    "qat_config",
    "preset_config", "read_model_json",
    "resolve_tokenizer",
    "run",
    "run_label",
    "score",
    "task_texts",
    "teacher_outputs",
    "tiny",
    "train_seed",
    "truncated",
    "validate",
    "write_outputs",
    "write_report",
]
