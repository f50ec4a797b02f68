r"""MobileBERT end to end in one command: teacher -> progressive transfer -> PD -> fine-tune on a task -> task KD ->
int8 + export, one recipe run by mobiledistill.engine and resumable at any stage.

  python -m mobiledistill.main --config=configs/mobilebert_task.py:local --workdir=runs/mobilebert_task_local
  python -m mobiledistill.main --config=configs/mobilebert_task.py --dry_run --devices=512
  python -m mobiledistill.main --config=configs/mobilebert_task.py:task=mrpc --workdir=gs://BUCKET/mobilebert_mrpc
  python -m mobiledistill.main --config=configs/mobilebert_task.py:task=custom,train=t.tsv,dev=d.tsv --workdir=runs/mine

Stages (`<workdir>/<stage>/`; `report.md` compares every model: parameters, FLOPs, accuracy, file size, latency):

  pretrain      configs/progressive.py: IB-BERT teacher pre-training -> one PKT stage per student layer -> PD ->
                the same student from scratch (for comparison); `teacher=hf:<dir>` imports the teacher instead
  teacher_task  the teacher fine-tuned on the task            (init_from pretrain/teacher, or the hf: teacher)
  student_task  the distilled student fine-tuned on the task  (init_from pretrain/pd)
  student_kd    the distilled student with task KD (soft cross-entropy at T 1 + the task loss), from teacher_task
  export        student_kd (student_task with kd=0) -> Hugging Face + ONNX fp32 + ONNX dynamic int8, each file
                verified against the JAX model and scored on the dev split

`arg` (comma-separated): local (the 2-core CPU variant: configs/progressive.py:local, then Rotten Tomatoes fine-tuning
on 2,000 training sentences; about 10 minutes), tiny (tests: seconds per stage, numbers mean nothing), task=<GLUE
task | custom> (default sst2; :local uses Rotten Tomatoes as its SST-2), train=<file>, dev=<file> (task=custom or
local files: TSV/CSV/JSONL with the task's columns), teacher=hf:<dir>, kd=0 (no task-KD stage), seeds=<n>.

Paper scale (default): the whole configs/progressive.py run (about 16 hours on a TPU v3-512), then the GLUE task
from TFDS at seq 128, 3 seeds each (minutes on the same slice).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ml_collections  # noqa: E402
import progressive  # noqa: E402

from mobiledistill.config import ConfigError  # noqa: E402
from mobiledistill.export_stage import export_config  # noqa: E402
from mobiledistill.finetune import finetune_config, parse_arg, tiny as tiny_task  # noqa: E402

KEYS = ("local", "tiny", "task", "train", "dev", "teacher", "kd", "seeds")


def _task_section(args, local: bool, tiny: bool) -> ml_collections.ConfigDict:
    c = finetune_config()
    c.task = args.get("task", "sst2")
    if args.get("train"):
        c.data.source = "files"
        c.data.files.train, c.data.files.validation = args["train"], args.get("dev", "")
    elif c.task == "custom":
        raise ConfigError("mobilebert_task.py: task=custom needs train=<file> and dev=<file>")
    elif local:
        if c.task != "sst2":
            raise ConfigError(f"mobilebert_task.py:local fine-tunes on Rotten Tomatoes (an SST-2 stand-in): "
                              f"task={c.task!r} needs train=<file>,dev=<file>")
        c.data.source = "rotten_tomatoes"
    if tiny:
        tiny_task(c)
        c.init = ""
        c.tokenizer = ""
        c.seeds = (0,)
        c.data.max_train_examples, c.data.max_eval_examples = 32, 16
    elif local:
        c.seeds = (0, 1)
        c.data.max_seq_length = 64
        c.data.max_train_examples = 2000
        c.data.max_eval_examples = 500
        c.train.batch, c.train.epochs, c.train.lr = 32, 3, 1e-3
        c.train.log_every = 20
    if "seeds" in args:
        c.seeds = tuple(range(int(args["seeds"])))
    return c


def get_config(arg=None):
    words = [w.strip() for w in (arg or "").split(",")]
    local, tiny = "local" in words, "tiny" in words  # variants (bare words); the rest are key=value
    args = parse_arg(",".join(w for w in words if w not in ("local", "tiny")), KEYS)
    kd = args.get("kd", "1") not in ("0", "")

    pretrain = progressive.get_config("local" if (local or tiny) else None)
    if tiny:
        pretrain.teacher.steps, pretrain.teacher.warmup_steps = 40, 4
        pretrain.pkt.steps_per_layer, pretrain.pkt.warmup_steps = 4, 1
        pretrain.pd.steps, pretrain.pd.warmup_steps = 20, 2
        pretrain.data.vocab_size = 512
        pretrain.student.num_hidden_layers = pretrain.teacher.num_hidden_layers = 2
        pretrain.train.eval_batches = 2
        pretrain.train.log_every = 10
    teacher = args.get("teacher", "")
    if teacher:
        if not teacher.startswith("hf:"):
            raise ConfigError(f"mobilebert_task.py: teacher={teacher!r}; valid: hf:<transformers directory>")
        pretrain.teacher.source = teacher
        pretrain.data.vocab = teacher[3:] + "/vocab.txt"
    pretrain.kind = "pretrain"

    c = ml_collections.ConfigDict()
    c.pretrain = pretrain
    c.teacher_task = _task_section(args, local, tiny)
    if teacher:
        c.teacher_task.init = teacher
    else:
        c.teacher_task.init_from = "pretrain/teacher"
    c.teacher_task.distill.teacher = ""
    c.student_task = _task_section(args, local, tiny)
    c.student_task.init_from = "pretrain/pd"
    stages = ["pretrain", "teacher_task", "student_task"]
    if kd:
        c.student_kd = _task_section(args, local, tiny)
        c.student_kd.init_from = "pretrain/pd"
        c.student_kd.teacher_from = "teacher_task"
        c.student_kd.distill.ce_weight = 1.0  # KD at T 1 plus the hard labels
        stages.append("student_kd")
    c.export = export_config()
    c.export.init_from = stages[-1]
    if tiny:
        c.export.repeats, c.export.eval_rows = 2, 16
    elif local:
        c.export.repeats = 20
    stages.append("export")
    c.stages = tuple(stages)
    return c
