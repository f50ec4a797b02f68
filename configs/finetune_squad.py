r"""Fine-tuning on SQuAD v1.1 (`:v1`) or v2.0 (`:v2`) with the official MobileBERT recipe (SPEC §4): AdamW lr 4e-5,
5 epochs, batch 32, seq 384, doc stride 128, questions cut to 64 tokens; n-best span decoding across windows, the
official EM/F1 (v2.0: with the null-answer threshold and best_exact/best_f1).

  python -m mobiledistill.main --config=configs/finetune_squad.py:v1,init=hf:/path/to/bert --workdir=runs/squad1
  python -m mobiledistill.main --config=configs/finetune_squad.py:v2,init=stage:runs/mobilebert/pd --workdir=runs/sq2
  python -m mobiledistill.main --config=configs/finetune_squad.py:v1,tiny=1 --workdir=/tmp/squad   # seconds

`arg`: the version (v1 / v2) and the keys of configs/finetune_glue.py (init, tokenizer, teacher, seeds, epochs, tiny).
Data: TFDS `squad/v1.1|v2.0`, or the official JSON files:
  --config.data.source=files --config.data.files.train=train-v1.1.json --config.data.files.validation=dev-v1.1.json

Rough cost per seed: ~88k questions -> ~89k windows x 5 epochs x 3 x 34 GFLOP (BERT-base at 384) ~ 45 PFLOP: about
1.5 hours on one V100-class GPU for BERT-base, MobileBERT ~4x less.
"""

from mobiledistill.config import ConfigError
from mobiledistill.finetune import ARG_KEYS, apply_arg, finetune_config, parse_arg

VERSIONS = {"v1": "v1.1", "v1.1": "v1.1", "v2": "v2.0", "v2.0": "v2.0"}


def get_config(arg=None):
    c = finetune_config()
    args = parse_arg(arg, ARG_KEYS)
    version = args.pop("task", "v1")
    if version not in VERSIONS:
        raise ConfigError(f"finetune_squad.py:{version}: valid versions are v1, v2")
    c.task = "squad"
    c.squad_version = VERSIONS[version]
    c.train.lr = 4e-5
    c.train.epochs = 5
    c.train.batch = 32
    c.data.max_seq_length = 384
    c.data.doc_stride = 128
    c.data.max_query_length = 64
    apply_arg(c, args)
    return c
