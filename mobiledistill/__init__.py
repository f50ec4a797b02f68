"""mobiledistill: knowledge distillation of BERT into MobileBERT-family students (JAX/Flax NNX)."""

__version__ = "0.1.0"
