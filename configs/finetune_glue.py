r"""Fine-tuning on one GLUE task (SPEC §4): AdamW lr 2e-5, weight decay 0.01, eps 1e-6, clip 1.0, 10% warm-up then
linear decay, batch 32 x seq 128, 3 epochs, evaluated on the dev split(s) after every epoch, three seeds (CoLA, MRPC
and RTE vary by ~3 points between seeds: report.md gives mean ± std).

  python -m mobiledistill.main --config=configs/finetune_glue.py:task=sst2,init=hf:/path/to/bert --workdir=runs/sst2
  python -m mobiledistill.main --config=configs/finetune_glue.py:task=rte,init=stage:runs/mobilebert/pd \
      --workdir=runs/rte                                                 # a finished pre-training stage
  python -m mobiledistill.main --config=configs/finetune_glue.py:task=sst2,init=hf:/path --workdir=runs/sst2 \
      --config.mode=eval                                                 # re-evaluate, write eval_* predictions
  python -m mobiledistill.main --config=configs/finetune_glue.py:task=mrpc,tiny=1 --workdir=/tmp/mrpc  # seconds
  python -m mobiledistill.main --config=configs/finetune_glue.py:task=custom,init=hf:/path/bert --workdir=runs/mine \
      --config.data.files.train=train.tsv --config.data.files.validation=dev.tsv  # your own labels

`arg` is comma-separated key=value (a bare word is the task):
  task       cola, sst2, mrpc, stsb (regression), qqp, mnli (matched + mismatched dev), qnli, rte, wnli, or custom
  init       hf:<transformers dir> | stage:<pipeline workdir>/<stage> | preset:<name> (random init; needs tokenizer)
  tokenizer  a vocab.txt / tokenizer.json / directory, or 'train' (WordPiece on the task's training text)
  teacher    hf:<fine-tuned dir> | finetune:<workdir> -> task distillation (see configs/distill_task.py)
  seeds      number of seeds (0..n-1), epochs, tiny=1 (test size: test_bert, 8 examples, 2 steps, seq 32)
Data: TFDS `glue/<task>` (--config.data.tfds_data_dir=...), or local files with TFDS's columns:
  --config.data.source=files --config.data.files.train=train.tsv --config.data.files.validation=dev.tsv
task=custom (your own labels; data.source='files' is implied): TSV/CSV/JSONL with a text column (or a pair) and a
label column; --config.data.files.test=... adds a test split, scored on its own. Accuracy and macro-F1 (+ F1 per
label in report.md); predictions are written as label names. Keys, all optional:
  --config.custom.labels=neg,neu,pos        class names in id order (default: the training file's labels, sorted)
  --config.custom.text_columns=review       or =question,answer (default: sentence1,sentence2 / text_a,text_b /
                                            premise,hypothesis / question1,question2 / question,sentence /
                                            sentence / text, the first the training file has)
  --config.custom.label_column=label        --config.custom.regression=True (Pearson/Spearman)
A label outside the task's labels stops the run before anything is written, naming the file, line and the valid
labels.

Rough cost per seed (3 epochs, seq 128): BERT-base ~3 GFLOP x 3 per example (forward + backward), so SST-2 (67k)
~1.8 PFLOP: about 10 minutes on one V100-class GPU, MobileBERT about 4x less; MNLI/QQP (393k/364k) about 6x SST-2;
RTE/MRPC/STS-B/CoLA/WNLI (<10k) a minute or two.
"""

from mobiledistill.finetune import apply_arg, finetune_config, parse_arg


def get_config(arg=None):
    c = finetune_config()
    apply_arg(c, parse_arg(arg))
    return c
