"""Writing an export's files: the Hugging Face directory, the tokenizer, ONNX fp32 and ONNX dynamic int8 (LiteRT:
export_tflite)."""

from __future__ import annotations

import os

import numpy as np

from mobiledistill.export_source import Source

OUTPUTS = {"classification": ("logits",), "span": ("start_logits", "end_logits"),
           "pretraining": ("prediction_logits", "seq_relationship_logits")}
HIDDEN = "last_hidden_state"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _hf_class(kind: str, cfg):
    import transformers

    from mobiledistill.convert import hf_arch
    arch = "Bert" if hf_arch(cfg) == "bert" else "MobileBert"
    suffix = {"classification": "ForSequenceClassification", "span": "ForQuestionAnswering",
              "pretraining": "ForPreTraining"}[kind]
    return getattr(transformers, arch + suffix)


def mean_pooled(src: Source) -> bool:
    """A classifier on the mean of the final hidden states (`classifier_pooling='mean'`): transformers has no such
    head (its *ForSequenceClassification reads [CLS]), so the hf format is refused, and the ONNX file and the PyTorch
    baseline are transformers' encoder plus the mean and the classifier (`load_transformers`)."""
    return src.kind == "classification" and src.model.encoder.cfg.classifier_pooling == "mean"


def load_transformers(src: Source, hf_dir: str):
    """The saved directory as transformers' own eval-mode model (eager attention: traceable, exact); for a
    mean-pooled classifier, transformers' encoder with the model's mean pooling and classifier on top."""
    from transformers.utils import logging
    logging.disable_progress_bar()  # stderr stays free for the one-line error
    logging.set_verbosity_error()
    if not mean_pooled(src):
        return _hf_class(src.kind, src.model.encoder.cfg).from_pretrained(hf_dir, attn_implementation="eager").eval()
    import types

    import torch
    import transformers

    from mobiledistill.convert import hf_arch

    arch = "BertModel" if hf_arch(src.model.encoder.cfg) == "bert" else "MobileBertModel"
    encoder = getattr(transformers, arch).from_pretrained(hf_dir, attn_implementation="eager",
                                                          add_pooling_layer=False)
    kernel = np.asarray(src.model.classifier.kernel[...], np.float32)
    head = torch.nn.Linear(*kernel.shape)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(kernel.T.copy()))
        head.bias.copy_(torch.from_numpy(np.array(src.model.classifier.bias[...], np.float32)))

    class MeanPooledClassifier(torch.nn.Module):
        """`models.encoder.token_mean` of the final hidden states over the attended tokens, then the classifier."""

        def __init__(self):
            super().__init__()
            self.encoder, self.classifier = encoder, head

        def forward(self, input_ids, attention_mask, token_type_ids, output_hidden_states=False):
            out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                               output_hidden_states=True)
            h = out.last_hidden_state
            w = (attention_mask != 0).to(h.dtype).unsqueeze(-1)
            pooled = (h * w).sum(1) / w.sum(1).clamp(min=1.0)
            return types.SimpleNamespace(logits=self.classifier(pooled), last_hidden_state=h,
                                         hidden_states=out.hidden_states if output_hidden_states else None)

    return MeanPooledClassifier().eval()


def write_hf(src: Source, hf_dir: str) -> None:
    """The transformers directory (the encoder alone for a mean-pooled classifier: see `mean_pooled`)."""
    from mobiledistill import convert

    if mean_pooled(src):
        convert.save_hf(src.model.encoder, hf_dir)
    else:
        convert.save_hf(src.model, hf_dir, label_names=src.label_names)
    write_tokenizer(src, hf_dir)


def write_tokenizer(src: Source, directory: str) -> None:
    """The run's WordPiece as a transformers fast tokenizer (BERT inputs incl. token_type_ids) plus vocab.txt."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from mobiledistill.data import load_tokenizer

    tok = load_tokenizer(src.tokenizer)
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok.backend.to_str()), unk_token="[UNK]",
                                   pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_input_names=list(INPUTS[:1] + INPUTS[2:] + INPUTS[1:2]),
                                   model_max_length=src.model.encoder.cfg.max_position_embeddings)
    fast.save_pretrained(directory)
    with open(os.path.join(directory, "vocab.txt"), "w") as f:
        f.write(tok.vocab_text())


def write_onnx(src: Source, hf_dir: str, path: str, seq_len: int) -> None:
    """`torch.onnx.export` (TorchScript exporter: no onnxscript needed) of the transformers model, one file."""
    import onnx
    import torch

    names = OUTPUTS[src.kind]

    class Outputs(torch.nn.Module):
        """The task outputs plus the final hidden state, as a tuple (ONNX needs plain tensors)."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                             output_hidden_states=True)
            return tuple(getattr(out, n) for n in names) + (out.hidden_states[-1],)

    wrapped = Outputs(load_transformers(src, hf_dir))
    example = tuple(torch.tensor(a) for a in random_inputs(src.model.encoder.cfg, 2, seq_len, seed=1))
    per_token = {"start_logits", "end_logits", "prediction_logits", HIDDEN}
    axes = {k: {0: "batch", 1: "sequence"} for k in INPUTS}
    axes.update({n: ({0: "batch", 1: "sequence"} if n in per_token else {0: "batch"}) for n in names + (HIDDEN,)})
    import warnings
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings of the TorchScript exporter
        torch.onnx.export(wrapped, example, path, dynamo=False, input_names=list(INPUTS),
                          output_names=list(names) + [HIDDEN], dynamic_axes=axes, opset_version=17)
    model = onnx.load(path)  # one self-contained file (no .data sidecar): what quant_pre_process accepts
    onnx.save_model(model, path, save_as_external_data=False)


def quantize_onnx(fp32_path: str, int8_path: str, scratch: str) -> None:
    """onnxruntime dynamic int8: shape-inference pre-processing, then int8 per-channel weights."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = os.path.join(scratch, "model.pre.onnx")
    quant_pre_process(fp32_path, pre, skip_symbolic_shape=True)  # the symbolic pass gives up on this graph
    quantize_dynamic(pre, int8_path, weight_type=QuantType.QInt8, per_channel=True)


def compact_onnx(path: str) -> dict:
    """Renames the graph's nodes and internal tensors (initializers included) to short ids and drops its shape
    `value_info` and doc strings, in place; graph inputs and outputs keep their names. The computation is unchanged.

    Why: the exporter's names (`/mobilebert/encoder/layer.3/attention/self/query/MatMul`, and quantisation's
    `_quantized` / `_scale` / `_zero_point` companions) cost about as many bytes as a small student's int8 weights.
    Returns {"bytes_before", "bytes_after", "renamed"}; a graph with subgraphs (If / Loop bodies, which may read
    outer names) is left as it is ("renamed": 0)."""
    import onnx

    before = os.path.getsize(path)
    model = onnx.load(path)
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return {"bytes_before": before, "bytes_after": before, "renamed": 0}
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    new: dict[str, str] = {"": ""}  # an absent optional input stays absent

    def short(name: str) -> str:
        if name not in new:
            new[name] = name if name in keep else f"t{len(new) - 1:x}"
        return new[name]

    for t in graph.initializer:
        t.name = short(t.name)
        t.doc_string = ""
    for i, node in enumerate(graph.node):
        node.name = f"n{i:x}"
        node.doc_string = ""
        node.input[:] = [short(x) for x in node.input]
        node.output[:] = [short(x) for x in node.output]
    del graph.value_info[:]
    graph.doc_string = ""
    onnx.checker.check_model(model)
    onnx.save_model(model, path, save_as_external_data=False)
    return {"bytes_before": before, "bytes_after": os.path.getsize(path), "renamed": len(new) - 1}


def random_inputs(cfg, batch: int, seq_len: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int64 (ids, attention mask, token types): two segments; rows after the first are padded to other lengths."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, cfg.vocab_size, (batch, seq_len)).astype(np.int64)
    types = np.broadcast_to((np.arange(seq_len) >= seq_len // 2).astype(np.int64), (batch, seq_len)).copy()
    mask = np.ones((batch, seq_len), np.int64)
    for b in range(1, batch):
        n = max(2, seq_len - 1 - (5 * b) % max(1, seq_len // 2))
        mask[b, n:], ids[b, n:], types[b, n:] = 0, cfg.pad_token_id, 0
    return ids, mask, types


def equalized_model(src: Source, seq_len: int, calibration: int, alpha: float | None = None):
    """(the residual-equalised copy of the model, the export.json record of the equalisation, scales included):
    the per-channel scales s are calibrated on `calibration` sequences (`mobiledistill.quantize`). Raises
    RuntimeError if the rescaled float32 model does not reproduce the original's task outputs (it must, to rounding)."""
    from mobiledistill import quantize
    from mobiledistill.data import load_tokenizer

    alpha = quantize.ALPHA if alpha is None else alpha
    cfg = src.model.encoder.cfg
    tok = load_tokenizer(src.tokenizer)
    batches = quantize.calibration_inputs(cfg, calibration, seq_len, cls_id=tok.cls_id, sep_id=tok.sep_id)
    ranges = quantize.residual_channel_ranges(src.model, batches)
    s = quantize.scales_from_ranges(ranges, quantize.reader_row_ranges(src.model), alpha)
    model = quantize.equalize_residual(src.model, s)
    ids, mask, types = batches[0]
    before, after = src.model(ids, types, mask), model(ids, types, mask)
    for a, b in zip(before[:-1], after[:-1]):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if np.max(np.abs(a - b)) > 1e-5 * max(float(np.max(np.abs(a))), 1e-30):
            raise RuntimeError("the residual-equalised model does not reproduce the original's outputs")
    return model, {**quantize.summary(s, ranges, alpha, calibration), "scales": [float(x) for x in s]}


def equalized_onnx(src: Source, model, scratch: str, seq_len: int) -> str:
    """The fp32 ONNX file of `model`, a copy of the source's model (the residual-equalised one), in `scratch`."""
    import dataclasses

    hf_dir = os.path.join(scratch, "hf_equalized")
    equalized = dataclasses.replace(src, model=model)
    write_hf(equalized, hf_dir)
    fp32 = os.path.join(scratch, "model.equalized.onnx")
    write_onnx(equalized, hf_dir, fp32, seq_len)
    return fp32


def equalized_int8(src: Source, int8_path: str, scratch: str, seq_len: int, calibration: int,
                   alpha: float | None = None, equalized=None) -> dict:
    """The residual-equalised dynamic int8 ONNX file: the copy of the model from `equalized_model` (or `equalized`,
    its result, when already computed; the fp32 files stay the original) exported to ONNX in `scratch` and
    quantised into `int8_path`. Its task outputs are the model's; its `last_hidden_state` is h / s.

    Returns the export.json record of the equalisation (scales included)."""
    model, record = equalized or equalized_model(src, seq_len, calibration, alpha)
    quantize_onnx(equalized_onnx(src, model, scratch, seq_len), int8_path, scratch)
    return record
