"""Sources: local text/JSONL/CSV files and their bad input, the embedded corpus, TFDS through mock_data."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from _data_helpers import corpus, tokenizer

from mobiledistill.data import (
    DataError,
    PretrainingIterator,
    TfdsCorpus,
    corpus_from_config,
    record_files,
    text_files,
)
from mobiledistill.data.embedded import python_docs


def test_text_files_one_document_per_block_or_per_file(tmp_path):
    (tmp_path / "a.txt").write_text("Doc one line one.\nDoc one line two.\n\n\nDoc two.\n")
    (tmp_path / "b.txt").write_text("Doc three.\n  \nDoc four.")
    blocks = text_files(str(tmp_path / "*.txt"))
    assert list(blocks) == ["Doc one line one.\nDoc one line two.", "Doc two.", "Doc three.", "Doc four."]
    files = text_files(str(tmp_path), doc_per="file")
    assert len(files) == 2 and files[1] == "Doc three.\n  \nDoc four."
    with pytest.raises(DataError, match="no file matches"):
        text_files(str(tmp_path / "*.missing"))
    with pytest.raises(DataError, match="doc_per"):
        text_files(str(tmp_path), doc_per="line")


def test_undecodable_lines_are_skipped_counted_and_reported_or_raise(tmp_path, caplog):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"Good line.\nBad \xff\xfe line.\nAnother good line.\n\nSecond doc.\n")
    c = text_files(str(path))
    assert list(c) == ["Good line.\nAnother good line.", "Second doc."]
    assert c.report.counts["undecodable_lines"] == 1
    assert f"{path}:2" in c.report.summary()
    assert "undecodable_lines=1" in caplog.text
    with pytest.raises(DataError) as info:
        text_files(str(path), on_bad_record="raise")
    assert f"{path}:2" in str(info.value) and "\n" not in str(info.value)


def test_empty_files_are_counted_and_an_empty_dataset_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("\n \n\t\n")
    (tmp_path / "real.txt").write_text("Some text.")
    c = text_files(str(tmp_path / "*.txt"))
    assert len(c) == 1 and c.report.counts["empty_files"] == 2
    with pytest.raises(DataError, match="empty") as info:
        text_files([str(tmp_path / "empty.txt"), str(tmp_path / "blank.txt")])
    assert "empty_files=2" in str(info.value)


def test_jsonl_and_csv_records(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(
        b'{"text": "First doc."}\nnot json\n{"text": ""}\n{"text": "Second \xff doc."}\n{"text": "Third."}\n'
    )
    c = record_files(str(jsonl))
    assert list(c) == ["First doc.", "Third."]
    assert c.report.as_dict() == {"empty_records": 1, "malformed_json_lines": 1, "undecodable_lines": 1}
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('id,body\n1,"A quoted, comma doc."\n2,"Multi\nline doc."\n')
    c = record_files(str(csv_path), text_key="body")
    assert list(c) == ["A quoted, comma doc.", "Multi\nline doc."]
    with pytest.raises(DataError, match=r"no field 'text'; fields present: \['body', 'id'\]"):
        record_files(str(csv_path))
    tsv = tmp_path / "d.tsv"
    tsv.write_text('text\tother\nA "tab" doc.\tx\n')
    assert list(record_files(str(tsv))) == ['A "tab" doc.']


def test_embedded_corpus_is_over_1mb_offline_and_deterministic():
    c = corpus()
    size = sum(len(d.encode("utf-8")) for d in c)
    assert size >= 1_000_000
    assert len(c) > 300
    rebuilt = python_docs.__wrapped__()
    assert [name for name, _ in rebuilt] == [name for name, _ in python_docs()]
    names = [name for name, _ in python_docs()]
    assert "json" in names and any(n.startswith("topic:") for n in names)
    assert not any(n.split(".")[0] in ("idlelib", "tkinter", "antigravity", "this", "test") for n in names)


def test_config_dicts_build_corpora(tmp_path):
    (tmp_path / "x.txt").write_text("Hello there.")
    assert list(corpus_from_config({"kind": "text", "paths": str(tmp_path / "x.txt")})) == ["Hello there."]
    with pytest.raises(DataError, match="unknown corpus kind 'parquet'"):
        corpus_from_config({"kind": "parquet"})


def test_tfds_wikipedia_style_corpus_through_mock_data():
    with tfds.testing.mock_data(num_examples=12):
        c = TfdsCorpus("wikipedia/20230601.en", "train")
        assert len(c) == 12 and isinstance(c[0], str) and c[0]
        it = PretrainingIterator(c, tokenizer(), global_batch_size=4, process_index=0, process_count=1)
        batch = it.next_numpy()
        assert batch["input_ids"].shape == (4, 128)
        with pytest.raises(DataError, match="no text field 'body'"):
            TfdsCorpus("wikipedia/20230601.en", "train", text_key="body")


def test_unknown_tfds_names_are_clear_errors():
    with tfds.testing.mock_data(num_examples=2):
        with pytest.raises(DataError) as info:
            TfdsCorpus("no_such_dataset_xyz", "train")
        assert "'no_such_dataset_xyz'" in str(info.value) and "\n" not in str(info.value)
        with pytest.raises(DataError, match="'glue/nosuch'.*BuilderConfig nosuch not found"):
            TfdsCorpus("glue/nosuch", "train", text_key="sentence")


def test_empty_tfds_split_is_a_clear_error():
    with tfds.testing.mock_data(num_examples=0), pytest.raises(DataError, match="is empty"):
        TfdsCorpus("wikipedia/20230601.en", "train")


def test_mixed_text_and_tfds_sources_stream():
    with tfds.testing.mock_data(num_examples=8):
        wiki = TfdsCorpus("wikipedia/20230601.en", "train")
        it = PretrainingIterator(
            [(wiki, 1.0), (corpus(), 1.0)], tokenizer(), global_batch_size=8, process_index=0, process_count=1
        )
        for _ in range(100):
            batch = it.next_numpy()
            assert np.all(batch["attention_mask"][:, 0] == 1)
            docs_read = [epoch * len(c) + pos for (epoch, pos), c in zip(it.get_state()["sources"], it.corpora)]
            if min(docs_read) >= 3:
                break
    assert min(docs_read) >= 3, f"both sources should be read, got {docs_read}"
