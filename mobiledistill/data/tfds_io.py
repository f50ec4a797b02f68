"""TFDS datasets as random-access sources, without TensorFlow.

`tfds.data_source` reads datasets prepared in the array_record format (it prepares them that way itself when
`download=True`), gives random access by index (what per-host sharding and exact resume need) and runs without
TensorFlow, which is not a dependency. Datasets prepared as TFRecord are refused by TFDS with a message saying to
re-prepare them as array_record; we pass that on as a DataError.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from mobiledistill.data.errors import DataError

# Builders defined in the legacy category packages register only when their package is imported; TFDS imports
# them lazily through a TensorFlow-dependent path, so we import the ones our datasets live in ourselves.
_LEGACY_BUILDER_PACKAGES = ("tensorflow_datasets.text", "tensorflow_datasets.question_answering")


def _register_legacy_builders() -> None:
    for package in _LEGACY_BUILDER_PACKAGES:
        try:
            importlib.import_module(package)
        except Exception:  # noqa: BLE001, S112 - a category that fails to import only hides its own builders
            continue


def open_tfds(name: str, split: str, *, data_dir: str | None = None, download: bool = False) -> Sequence[Any]:
    """The random-access source of TFDS `name` (e.g. 'glue/sst2', 'wikipedia/20230601.en') and `split`."""
    import tensorflow_datasets as tfds

    _register_legacy_builders()
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(
            f"unknown TFDS dataset {name!r}: no such builder is registered "
            "(e.g. 'wikipedia/20230601.en', 'glue/sst2', 'squad/v1.1')"
        ) from None
    except Exception as e:  # noqa: BLE001 - unknown config/split, data not prepared: TFDS says which
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(
            f"TFDS dataset {name!r} split {split!r} is unavailable: {first} "
            f"(data_dir={data_dir!r}; download=True prepares it as array_record)"
        ) from None
    if len(source) == 0:
        raise DataError(f"TFDS dataset {name!r} split {split!r} is empty: no examples to read")
    return source


def as_text(value: Any) -> str:
    """A TFDS text feature (str, bytes or 0-d numpy array) as str; raises UnicodeDecodeError on bad bytes."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def check_keys(record: dict, keys: Sequence[str], what: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise DataError(f"{what}: missing field(s) {', '.join(map(repr, missing))}; fields present: {sorted(record)}")
