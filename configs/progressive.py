r"""MobileBERT with progressive knowledge transfer (Sun et al., 2020): teacher -> PKT (one stage per layer) -> PD.

Paper scale (default): IB-BERT_LARGE teacher pre-trained here (500k steps), MobileBERT student, 24 x 10k PKT steps,
500k PD steps, LAMB, global batch 4096 x seq 128 on Wikipedia (TFDS). About 470 EFLOP of teacher pre-training and
240 EFLOP of distillation: roughly 16 hours on a TPU v3-512 at 40% MFU (`--dry_run --devices=512` prints the plan).

  python -m mobiledistill.main --config=configs/progressive.py --workdir=gs://BUCKET/mobilebert
  python -m mobiledistill.main --config=configs/progressive.py --dry_run --devices=512

Import a teacher instead of pre-training one:  --config.teacher.source=hf:/path/to/ibbert (transformers directory).

`:local` runs the whole pipeline on this machine's CPU in about 5 minutes, offline: on the embedded corpus (the
Python documentation) with a WordPiece vocab trained on it, a small IB-BERT-shaped teacher, a small MobileBERT-shaped
student, progressive transfer over all its layers, PD, and the same student trained from scratch for comparison.

  python -m mobiledistill.main --config=configs/progressive.py:local --workdir=/tmp/mobiledistill
"""

from mobiledistill.config import pretraining_config


def local(c):
    """Shrinks `c` in place to the offline CPU demo (shared by the joint/auxiliary configs)."""
    c.data.source = "embedded"
    c.data.vocab = "train"
    c.data.vocab_size = 2048
    c.data.max_seq_length = 64
    c.data.max_predictions_per_seq = 10
    c.data.heldout_every = 20
    small = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, embedding_size=32,
                 max_position_embeddings=128)
    c.teacher.update(small, intra_bottleneck_size=128, intermediate_size=256)
    c.student.update(small, intra_bottleneck_size=32, intermediate_size=64, num_feedforward_networks=2)
    c.teacher.steps, c.teacher.warmup_steps, c.teacher.lr = 800, 80, 1e-2
    c.pkt.steps_per_layer, c.pkt.warmup_steps, c.pkt.lr = 60, 6, 1e-2
    c.pd.steps, c.pd.warmup_steps, c.pd.lr = 400, 40, 1e-2
    c.train.global_batch = 32
    c.train.log_every = 50
    c.train.checkpoint_every = 100
    c.train.eval_batches = 20
    c.scratch_baseline = True
    return c


def get_config(arg=None):
    c = pretraining_config()
    if arg == "local":
        local(c)
    elif arg not in (None, "", "paper"):
        raise ValueError(f"configs/progressive.py: unknown variant {arg!r}; valid: paper (default), local")
    return c
