"""Read training records from the embedded task or from local files.

A *record* is a plain dict. Classification records have ``text`` and ``label`` (the label an
integer index into the run's label list); causal-LM records have ``instruction`` and
``response``. Column names in the user's files are mapped by :class:`~fedlora.config.DataConfig`.

Supported sources: the embedded task (``"embedded"``), CSV, JSONL, Parquet and directories
written by ``datasets.Dataset.save_to_disk``. Every failure names the file and the fix.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.config import DataConfig

Record = dict[str, Any]
WHERE = "__fedlora_where__"  # each raw row's place in its file ("line 12", "row 5"), for errors


class DataError(ValueError):
    """Training data is missing, malformed, or does not fit the task."""


@dataclass(frozen=True)
class TaskData:
    """The run's data before partitioning: train records, held-out test records, label names."""

    train: list[Record]
    test: list[Record]
    labels: tuple[str, ...]


def detect_format(path: Path) -> str:
    """Return the file format of ``path`` from its suffix (or ``hf-disk`` for a saved dataset dir)."""
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            return "hf-disk"
        raise DataError(
            f"{str(path)!r} is a directory but not a saved Hugging Face dataset (no dataset_info.json)"
        )
    suffix = path.suffix.lower()
    for fmt, suffixes in {
        "csv": (".csv",),
        "jsonl": (".jsonl", ".json"),
        "parquet": (".parquet", ".pq"),
    }.items():
        if suffix in suffixes:
            return fmt
    raise DataError(
        f"cannot tell the format of {str(path)!r} from its suffix; "
        "set data.format to csv, jsonl, parquet or hf-disk"
    )


def read_rows(source: str, fmt: str = "auto", *, lenient: bool = False) -> list[Record]:
    """Read all rows of a local file or saved dataset as dicts.

    ``lenient=True`` (a node's own file under record-level DP): a JSONL line that is not a JSON
    object becomes an empty row (which the record mappers then replace by a public filler)
    instead of an error, so whether the node errs does not depend on one line.

    Raises
    ------
    DataError
        If the path is missing, unreadable, or empty.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"data source {source!r} does not exist; pass a CSV/JSONL/Parquet file or a saved dataset dir"
        )
    if not (path.is_file() or path.is_dir()):  # a FIFO or device would block or stream forever
        raise DataError(
            f"data source {source!r} is not a regular file or a dataset directory; pass a CSV/JSONL/Parquet "
            "file or a saved dataset dir"
        )
    fmt = detect_format(path) if fmt == "auto" else fmt
    try:
        if fmt == "csv":
            import pandas as pd

            rows = pd.read_csv(path).to_dict(orient="records")
        elif fmt == "jsonl":
            rows = _read_jsonl(path, lenient)
        elif fmt == "parquet":
            import pandas as pd

            rows = pd.read_parquet(path).to_dict(orient="records")
        elif fmt == "hf-disk":
            from datasets import Dataset, DatasetDict, load_from_disk

            ds = load_from_disk(str(path))
            if isinstance(ds, DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
            assert isinstance(ds, Dataset)
            rows = list(ds)
        else:
            raise DataError(f"unknown data format {fmt!r}; use csv, jsonl, parquet or hf-disk")
    except DataError:
        raise
    except Exception as err:  # the readers raise many types; say which file failed and why
        raise DataError(f"cannot read {source!r} as {fmt}: {err}") from err
    if not rows:
        raise DataError(f"data source {source!r} has no rows")
    return _located([r if isinstance(r, dict) or not lenient else {} for r in rows], fmt, source)


def _located(rows: list[Any], fmt: str, source: str) -> list[Record]:
    """Check every row is an object and tag it with its place in the file (line for text formats)."""
    out = []
    for i, row in enumerate(rows):
        where = row.pop(WHERE) if isinstance(row, dict) and WHERE in row else _where(fmt, i)
        if not isinstance(row, dict):
            raise DataError(
                f"{source!r} {where}: a row must be an object with named columns, got {type(row).__name__} "
                f"{str(row)[:60]!r}"
            )
        out.append({**row, WHERE: where})
    return out


def _where(fmt: str, index: int) -> str:
    # CSV: line 1 is the header (a quoted field spanning lines shifts this; pandas does not say).
    return f"line {index + 2}" if fmt == "csv" else f"row {index + 1}"


def _read_jsonl(path: Path, lenient: bool = False) -> list[Record]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        items = json.loads(text)
        return [{**x, WHERE: f"item {i}"} if isinstance(x, dict) else x for i, x in enumerate(items)]
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                if not lenient:
                    raise DataError(f"{str(path)!r} line {i} is not valid JSON: {err}") from err
                row = {}
            if not isinstance(row, dict) and lenient:
                row = {}
            if not isinstance(row, dict):
                raise DataError(
                    f"{str(path)!r} line {i}: a row must be a JSON object, got {type(row).__name__}"
                )
            rows.append({**row, WHERE: f"line {i}"})
    return rows


def _require_columns(rows: Sequence[Record], columns: Sequence[str], source: str, field_hint: str) -> None:
    available = sorted(k for k in rows[0] if k != WHERE)
    for col in columns:
        if col not in rows[0]:
            raise DataError(
                f"column {col!r} not found in {source!r} (columns: {available}); "
                f"set {field_hint} to the right column"
            )


FILLER_RECORD: Record = {"text": "filler", "label": 0}
"""The public record that stands in for a bad row under record-level DP (see ``filler``)."""


def classification_records(
    rows: Sequence[Record],
    cfg: DataConfig,
    source: str,
    labels: Sequence[str] | None = None,
    *,
    filler: bool = False,
) -> tuple[list[Record], tuple[str, ...]]:
    """Map raw rows to ``{"text", "label"}`` records with integer labels.

    ``labels`` fixes the label list (for a test set read after the training set); a label
    outside it is an error. Without it, labels are the sorted distinct values.

    ``filler=True`` (a node under record-level DP, with ``labels`` given by the server): a row
    that would be an error (a label outside ``labels``, a missing label, empty text) is replaced
    by :data:`FILLER_RECORD` instead. Otherwise whether the node errs would tell the server, who
    picks ``labels``, whether one record exists; a public stand-in keeps the data size and is a
    replace-one neighbour, which the DP guarantee covers. The caller logs the count locally.
    """
    if filler and labels is not None:
        return _with_filler(rows, cfg, source, labels), tuple(labels)
    _require_columns(
        rows, [cfg.text_column, cfg.label_column], source, "data.text_column / data.label_column"
    )
    raw_labels = [_check_label(r, cfg.label_column, source) for r in rows]
    if labels is None:
        labels = tuple(str(v) for v in sorted({_label_key(v) for v in raw_labels}, key=_sort_key))
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for i, (row, raw) in enumerate(zip(rows, raw_labels, strict=True)):
        where = row.get(WHERE, f"row {i + 1}")
        key = str(_label_key(raw))
        if key not in index:
            raise DataError(
                f"{source!r} {where} has label {key!r}, which is not among the known labels {list(labels)}"
            )
        text = row.get(cfg.text_column)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{source!r} {where} has an empty or non-text {cfg.text_column!r}")
        out.append({"text": text, "label": index[key]})
    return out, tuple(labels)


def _with_filler(rows: Sequence[Record], cfg: DataConfig, source: str, labels: Sequence[str]) -> list[Record]:
    index = {name: i for i, name in enumerate(labels)}
    out: list[Record] = []
    for row in rows:
        try:
            key = str(_label_key(_check_label(row, cfg.label_column, source)))
        except DataError:
            key = None
        text = row.get(cfg.text_column)
        good = key in index and isinstance(text, str) and bool(text.strip())
        out.append({"text": text, "label": index[key]} if good else dict(FILLER_RECORD))
    return out


def _check_label(row: Record, column: str, source: str) -> Any:
    """Return the row's label after checking it is present, non-empty and a single scalar."""
    where = row.get(WHERE, "a row")
    if column not in row:
        raise DataError(f"{source!r} {where} has no {column!r}; every row needs a label")
    value = row[column]
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()  # a numpy scalar from pandas
    if (
        value is None
        or (isinstance(value, float) and value != value)
        or (isinstance(value, str) and not value.strip())
    ):
        raise DataError(f"{source!r} {where} has an empty {column!r}; fill in the label or drop the row")
    if isinstance(value, float) and not value.is_integer():
        raise DataError(f"{source!r} {where} has label {value!r}: labels are names or integers")
    if isinstance(value, bool):  # JSON true/false would silently become the classes "True"/"False"
        raise DataError(
            f"{source!r} {where} has the boolean label {value!r}: write labels as names "
            '(e.g. "yes"/"no") or integers'
        )
    if not isinstance(value, str | int | float):
        raise DataError(
            f"{source!r} {where} has a {type(value).__name__} label {str(value)[:40]!r}: "
            "a label must be a single string or integer"
        )
    return value


def _label_key(value: Any) -> Any:
    # Integral floats (pandas reads int columns with NaN as float) are the same label as ints.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _sort_key(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, int | float) else (1, str(value))


FILLER_INSTRUCTION: Record = {"instruction": "filler", "response": "filler"}
"""The public instruction record that stands in for a bad row under record-level DP."""


def instruction_records(
    rows: Sequence[Record], cfg: DataConfig, source: str, *, filler: bool = False
) -> list[Record]:
    """Map raw rows to ``{"instruction", "response"}`` records for causal-LM fine-tuning.

    ``filler=True`` (record-level DP): a row without an instruction or response becomes
    :data:`FILLER_INSTRUCTION` instead of an error (see :func:`classification_records`).
    """
    if filler:
        cols = (cfg.instruction_column, cfg.response_column)
        return [
            {"instruction": str(r[cols[0]]), "response": str(r[cols[1]])}
            if all(isinstance(r.get(c), str | int | float) and not isinstance(r.get(c), bool) for c in cols)
            else dict(FILLER_INSTRUCTION)
            for r in rows
        ]
    _require_columns(
        rows,
        [cfg.instruction_column, cfg.response_column],
        source,
        "data.instruction_column / data.response_column",
    )
    out = []
    for r in rows:
        for col in (cfg.instruction_column, cfg.response_column):
            if r.get(col) is None:
                raise DataError(f"{source!r} {r.get(WHERE, 'a row')} has no {col!r}")
        out.append({"instruction": str(r[cfg.instruction_column]), "response": str(r[cfg.response_column])})
    return out


def load_task_data(cfg: DataConfig, task: str) -> TaskData:
    """Return the run's train/test records and label names (deterministic for ``cfg.seed``).

    ``task = "auto"`` (a config not yet derived) takes the task the data describes
    (:func:`fedlora.derive.infer_task`).
    """
    if task == "auto":
        from fedlora.derive import infer_task

        task = infer_task(cfg)
    if cfg.source == "embedded":
        if task != "classification":
            raise DataError(
                "the embedded task is classification; for causal-lm use data.source = 'instruct' "
                "(generated instruction tasks) or an instruction file"
            )
        from fedlora.data.embedded import EMBEDDED_LABELS, embedded_splits

        train, test = embedded_splits(cfg.num_train, cfg.num_test, cfg.seed)
        return TaskData(list(train), list(test), tuple(EMBEDDED_LABELS))
    if cfg.source == "instruct":  # generated instruction tasks; labels are task types
        if task != "causal-lm":
            raise DataError("data.source = 'instruct' is instruction data; set model.task = 'causal-lm'")
        from fedlora.data.instruct import TASK_TYPES, instruct_splits

        train, test = instruct_splits(cfg.num_train, cfg.num_test, cfg.seed)
        return TaskData(train, test, TASK_TYPES)
    rows = read_rows(cfg.source, cfg.format)
    test_rows = read_rows(cfg.test_source, cfg.format) if cfg.test_source else None
    if test_rows is None:
        rows, test_rows = _split(rows, cfg.test_fraction, cfg.seed)
    if task == "classification":
        train, labels = classification_records(rows, cfg, cfg.source)
        test, _ = classification_records(test_rows, cfg, cfg.test_source or cfg.source, labels)
        return TaskData(train, test, labels)
    return TaskData(
        instruction_records(rows, cfg, cfg.source),
        instruction_records(test_rows, cfg, cfg.test_source or cfg.source),
        (),
    )


def _split(rows: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    import random

    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(len(rows) * fraction))
    if n_test >= len(rows):
        raise DataError(
            f"only {len(rows)} rows: too few to hold out a test split; add data or pass data.test_source"
        )
    return [rows[i] for i in order[n_test:]], [rows[i] for i in order[:n_test]]
