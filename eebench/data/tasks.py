"""Tasks and data: task specs (``tasks/*.yaml``), loading, subsetting, tokenising and batching.

A task is data, not code: one YAML file names the hub source, the GLUE_DIR folder, the files of
each split and their column layout, the text fields, the label map and the metrics. A user's own
task is one more YAML file pointing at CSV / TSV / JSONL / parquet files.

Where a split comes from, in order: the ``data_dir`` argument (``--data-dir``), else the
``GLUE_DIR`` environment variable (the original GLUE layout ``GLUE_DIR/<Folder>/<file>``), else
the Hugging Face hub. Local files are read and validated here (quoting off for GLUE TSVs, BOMs
stripped, labels mapped) before anything is written, so bad input raises one
:class:`~eebench.errors.EebenchError` and leaves no files behind. Validated splits are cached as
Arrow under ``$HF_DATASETS_CACHE/eebench`` so the next load (and the tokenised copy, which
``datasets`` caches next to it) is fast.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import shutil
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, field_validator, model_validator

from eebench.errors import EebenchError, UnknownNameError
from eebench.exits.metrics import METRICS

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger(__name__)

_CACHE_VERSION = "eebench-data-1"
_FORMAT_BY_SUFFIX = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

# --------------------------------------------------------------------------- the task spec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HubSource(_Strict):
    """A Hugging Face hub dataset: ``datasets.load_dataset(path, name)``."""

    path: str
    name: str | None = None
    # hub column -> our field, for hub datasets whose columns are not named like text_fields/label
    columns: dict[str, str] | None = None


class FileFormat(_Strict):
    """How a split's file is laid out. ``columns`` maps each text field and ``label`` to a column
    name (files with a header, JSONL, parquet) or a 0-based column index (negative counts from
    the end); by default every field is read from the column of the same name."""

    type: Literal["tsv", "csv", "jsonl", "parquet"] | None = None  # None: from the file's suffix
    header: bool = True
    delimiter: str | None = None  # default: tab for tsv, comma for csv
    quoting: Literal["none", "minimal"] | None = None  # default: none for tsv (GLUE), minimal for csv
    encoding: str = "utf-8-sig"  # strips a UTF-8 byte-order mark (MRPC has one)
    columns: dict[str, str | int] | None = None


class SplitSpec(_Strict):
    """One split: a file (relative to GLUE_DIR/<glue_dir>, or to the YAML's folder for a task
    without ``glue_dir``) and/or the hub split name."""

    file: str | None = None
    hub_split: str | None = None
    format: FileFormat | None = None

    @model_validator(mode="after")
    def _some_source(self) -> SplitSpec:
        if self.file is None and self.hub_split is None:
            raise ValueError("a split needs a file, a hub_split or both")
        return self


def _yaml_label(x: Any, where: str) -> Any:
    if isinstance(x, bool):  # YAML 1.1 reads yes/no/on/off/true/false unquoted as booleans
        raise ValueError(f"{where}: YAML read a label as the boolean {x}; quote labels such as 'yes' / 'no'")
    return str(x) if isinstance(x, int | float) else x


class TaskSpec(_Strict):
    """A task as data: where its splits come from, which columns hold the text and the label,
    how labels map to class ids, and how it is scored."""

    name: str
    description: str = ""
    hub: HubSource | None = None
    glue_dir: str | None = None
    text_fields: list[str]
    label_names: list[str] | None = None
    label_map: dict[str, int] | None = None  # raw label value in the file -> class id
    regression: bool = False
    label_range: tuple[float, float] | None = None  # regression only: accepted [low, high]
    num_labels: int
    metrics: list[str]
    main_metric: str
    train_split: str | None = "train"
    eval_split: str = "dev"
    format: FileFormat | None = None
    splits: dict[str, SplitSpec]

    _spec_file: Path | None = PrivateAttr(default=None)

    @property
    def is_regression(self) -> bool:
        return self.regression

    @property
    def spec_file(self) -> Path | None:
        """The YAML file this spec was read from (None for a spec built in Python)."""
        return self._spec_file

    @property
    def base_dir(self) -> Path:
        """Relative file paths of a task without ``glue_dir`` are resolved against this folder."""
        return self._spec_file.parent if self._spec_file is not None else Path.cwd()

    @model_validator(mode="before")
    @classmethod
    def _derive_num_labels(cls, data: Any) -> Any:
        if isinstance(data, dict) and "num_labels" not in data:
            data = dict(data)
            if data.get("regression"):
                data["num_labels"] = 1
            elif isinstance(data.get("label_names"), list):
                data["num_labels"] = len(data["label_names"])
            else:
                data["num_labels"] = 0  # the after-validator says what is missing
        return data

    @field_validator("label_names", mode="before")
    @classmethod
    def _string_names(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [_yaml_label(x, "label_names") for x in v]
        return v

    @field_validator("label_map", mode="before")
    @classmethod
    def _string_keys(cls, v: Any) -> Any:
        # YAML reads `{0: 0, 1: 1}` with int keys; raw labels are compared as strings
        if isinstance(v, dict):
            return {_yaml_label(k, "label_map"): val for k, val in v.items()}
        return v

    @model_validator(mode="after")
    def _check(self) -> TaskSpec:
        if not 1 <= len(self.text_fields) <= 2 or len(set(self.text_fields)) != len(self.text_fields):
            raise ValueError(f"text_fields must name 1 or 2 distinct columns, got {self.text_fields}")
        if "label" in self.text_fields:
            raise ValueError("'label' cannot be a text field")
        if self.regression:
            if self.label_names is not None or self.label_map is not None:
                raise ValueError("a regression task has no label_names / label_map")
            if self.num_labels != 1:
                raise ValueError(f"a regression task has num_labels 1, got {self.num_labels}")
            if self.label_range is not None and self.label_range[0] > self.label_range[1]:
                raise ValueError(f"label_range {list(self.label_range)} is empty")
        else:
            if not self.label_names or len(self.label_names) < 2:
                raise ValueError("a classification task needs label_names (at least 2); set regression: true "
                                 "for float labels")
            if len(set(self.label_names)) != len(self.label_names):
                raise ValueError(f"label_names repeat a name: {self.label_names}")
            if self.num_labels != len(self.label_names):
                raise ValueError(f"num_labels {self.num_labels} != {len(self.label_names)} label_names")
            if self.label_range is not None:
                raise ValueError("label_range is for regression tasks")
            if self.label_map is None:
                lm = {name: i for i, name in enumerate(self.label_names)}
                for i in range(self.num_labels):
                    lm.setdefault(str(i), i)
                self.label_map = lm
            bad = {k: v for k, v in self.label_map.items() if not 0 <= v < self.num_labels}
            if bad:
                raise ValueError(f"label_map ids must lie in 0..{self.num_labels - 1}, got {bad}")
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric {unknown[0]!r}; known: {', '.join(sorted(METRICS))}")
        if not self.metrics:
            raise ValueError("metrics is empty")
        if self.main_metric not in self.metrics:
            raise ValueError(f"main_metric {self.main_metric!r} is not one of metrics {self.metrics}")
        for m in self.metrics:
            if METRICS[m].regression != self.regression:
                kind = "regression" if METRICS[m].regression else "classification"
                raise ValueError(f"metric {m!r} is for {kind} tasks")
        if "f1" in self.metrics and self.num_labels != 2:
            raise ValueError("metric 'f1' is binary F1 and needs exactly 2 labels")
        if not self.splits:
            raise ValueError("splits is empty")
        for role, split in (("eval_split", self.eval_split), ("train_split", self.train_split)):
            if split is not None and split not in self.splits:
                raise ValueError(f"{role} {split!r} is not one of splits: {', '.join(self.splits)}")
        fields = {*self.text_fields, "label"}
        for where, fmt in [("format", self.format)] + [(f"splits.{k}.format", s.format) for k, s in self.splits.items()]:
            if fmt is not None and fmt.columns is not None and set(fmt.columns) != fields:
                raise ValueError(f"{where}.columns must map exactly {sorted(fields)}, got {sorted(fmt.columns)}")
        if self.hub is not None and self.hub.columns is not None and set(self.hub.columns.values()) != fields:
            raise ValueError(f"hub.columns must map onto exactly {sorted(fields)}")
        for k, s in self.splits.items():
            if s.file is None and self.hub is None:
                raise ValueError(f"split {k!r} has only a hub_split but the task has no hub source")
        return self

    def file_format(self, split: str) -> FileFormat:
        """The file layout of ``split``: its own ``format``, else the task's, else the defaults."""
        return self.splits[split].format or self.format or FileFormat()

    def columns(self, split: str) -> dict[str, str | int]:
        """Field -> source column for ``split`` (identity unless the format says otherwise)."""
        cols = self.file_format(split).columns
        return dict(cols) if cols is not None else {**{f: f for f in self.text_fields}, "label": "label"}


def _one_line_validation_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts).replace("\n", " ")


def _spec_from_yaml(path: Path) -> TaskSpec:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EebenchError(f"task file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EebenchError(f"{path}: cannot read task file ({e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise EebenchError(f"{path}{line}: malformed YAML: {problem}") from None
    if not isinstance(data, dict):
        raise EebenchError(f"{path}: a task spec must be a YAML mapping, found {type(data).__name__}")
    data.setdefault("name", path.stem)
    try:
        spec = TaskSpec.model_validate(data)
    except ValidationError as e:
        raise EebenchError(f"{path}: invalid task spec: {_one_line_validation_error(e)}") from None
    spec._spec_file = path.resolve()
    return spec


def _packaged() -> dict[str, Any]:
    root = resources.files("eebench.tasks")
    return {p.name[: -len(".yaml")]: p for p in root.iterdir() if p.name.endswith(".yaml")}


def list_tasks() -> list[str]:
    """Names of the packaged task specs (``tasks/*.yaml``), sorted."""
    return sorted(_packaged())


def get_task(name_or_path: str | os.PathLike | TaskSpec) -> TaskSpec:
    """A registered task by name, or a task spec read from a ``.yaml`` path."""
    if isinstance(name_or_path, TaskSpec):
        return name_or_path
    key = os.fspath(name_or_path)
    packaged = _packaged()
    if key in packaged:
        with resources.as_file(packaged[key]) as p:
            return _spec_from_yaml(Path(p))
    path = Path(key).expanduser()
    if path.suffix.lower() in (".yaml", ".yml") or path.is_file():
        return _spec_from_yaml(path)
    raise UnknownNameError(f"unknown task {key!r}; known: {', '.join(sorted(packaged))} "
                           "(or give the path of a task .yaml file)")


def check_trainable(spec: TaskSpec) -> None:
    """Raise before any work starts if early-exit training cannot handle the task."""
    if spec.is_regression:
        raise EebenchError(f"task {spec.name!r} is a regression task: early exiting for regression (STS-B) is "
                           "not implemented; its splits load and score, but it cannot be trained")


# --------------------------------------------------------------------------- where a split comes from


def _truthy(v: str | None) -> bool:
    return (v or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _offline() -> str | None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if _truthy(os.environ.get(var)):
            return var
    return None


def _local_hint(spec: TaskSpec, split: str) -> str:
    s = spec.splits[split]
    if spec.glue_dir and s.file:
        return (f"set GLUE_DIR to a GLUE download (GLUE_DIR/{spec.glue_dir}/{s.file}) "
                f"or pass --data-dir")
    return "use a task YAML whose splits name local files"


def _glue_layout(root: str | Path, spec: TaskSpec) -> str:
    files = ",".join(s.file for s in spec.splits.values() if s.file)
    return f"{root}/{spec.glue_dir}/{{{files}}}"


def _resolve_file(spec: TaskSpec, split: str, data_dir: str | os.PathLike | None) -> Path | None:
    """The local file of ``split``, or None when the split should come from the hub."""
    s = spec.splits[split]
    if spec.glue_dir is None:
        if s.file is None:
            return None
        p = Path(s.file).expanduser()
        base = Path(data_dir).expanduser() if data_dir is not None else spec.base_dir
        path = p if p.is_absolute() else base / p
        if not path.is_file():
            raise EebenchError(f"{path}: file not found (split {split!r} of task {spec.name!r}; relative paths "
                               f"are resolved against {base})")
        return path
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise EebenchError(f"data dir {root} does not exist; expected a GLUE download "
                               f"({_glue_layout(root, spec)}) or the {spec.glue_dir} folder itself")
        if s.file is None:
            raise EebenchError(f"split {split!r} of task {spec.name!r} has no local file, only hub split "
                               f"{s.hub_split!r}; drop --data-dir to load it from the hub")
        folder = root / spec.glue_dir if (root / spec.glue_dir).is_dir() else root
        path = folder / s.file
        if not path.is_file():
            raise EebenchError(f"{path}: file not found; expected the GLUE layout {_glue_layout(root, spec)} "
                               f"or {root}/{s.file}")
        return path
    glue = os.environ.get("GLUE_DIR")
    if glue:
        root = Path(glue).expanduser()
        if s.file is None:
            return None
        if not root.is_dir():
            raise EebenchError(f"GLUE_DIR={glue} does not exist; expected the GLUE layout {_glue_layout(glue, spec)}")
        folder = root / spec.glue_dir
        if not folder.is_dir():
            raise EebenchError(f"{folder}: folder not found (GLUE_DIR={glue}); expected the GLUE layout "
                               f"{_glue_layout(glue, spec)}")
        path = folder / s.file
        if not path.is_file():
            raise EebenchError(f"{path}: file not found (GLUE_DIR={glue}); expected the GLUE layout "
                               f"{_glue_layout(glue, spec)}")
        return path
    return None


# --------------------------------------------------------------------------- reading and validating


class _Rows:
    """Raw values of the needed columns plus where each row sits (line or row numbers)."""

    def __init__(self, source: str, unit: str, cols: dict[str, list], where: list[int],
                 names: dict[str, str | int]):
        self.source, self.unit, self.cols, self.where, self.names = source, unit, cols, where, names

    def loc(self, i: int) -> str:
        return f"{self.source}:{self.where[i]}" if self.unit == "line" else f"{self.source}: row {self.where[i]}"


def _col_index(path: Path, header: list[str] | None, width: int, line: int, field: str, col: str | int) -> int:
    if isinstance(col, int):
        i = col + width if col < 0 else col
        if not 0 <= i < width:
            raise EebenchError(f"{path}:{line}: column index {col} (for {field}) is out of range: the file has "
                               f"{width} columns")
        return i
    if header is None:
        raise EebenchError(f"{path}: the format has header: false, so column {col!r} (for {field}) must be a "
                           "0-based column index")
    if col not in header:
        raise EebenchError(f"{path}: column {col!r} (for {field}) not found; columns found: {', '.join(header)}")
    return header.index(col)


def _read_delimited(path: Path, fmt: FileFormat, kind: str, columns: dict[str, str | int]) -> _Rows:
    delim = fmt.delimiter or ("\t" if kind == "tsv" else ",")
    quoting = fmt.quoting or ("none" if kind == "tsv" else "minimal")
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    out: dict[str, list] = {k: [] for k in columns}
    where: list[int] = []
    idx: dict[str, int] | None = None
    width, first, prev = 0, 0, 0
    sep = "tab" if delim == "\t" else repr(delim)
    try:
        with open(path, encoding=fmt.encoding, newline="") as fh:
            reader = csv.reader(fh, delimiter=delim,
                                quoting=csv.QUOTE_NONE if quoting == "none" else csv.QUOTE_MINIMAL)
            for row in reader:
                start, prev = prev + 1, reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                if idx is None:
                    first, width = start, len(row)
                    header = [h.strip().lstrip("\ufeff") for h in row] if fmt.header else None
                    idx = {k: _col_index(path, header, width, start, k, c) for k, c in columns.items()}
                    if header is not None:
                        continue
                if len(row) != width:
                    like = "the header" if fmt.header else f"line {first}"
                    hint = ("quotes are literal: quoting is off" if quoting == "none"
                            else "a field that contains the delimiter must be in double quotes")
                    raise EebenchError(f"{path}:{start}: {len(row)} {sep}-separated fields, expected {width} as on "
                                       f"{like} ({hint})")
                for k, i in idx.items():
                    out[k].append(row[i])
                where.append(start)
    except UnicodeDecodeError as e:
        raise EebenchError(f"{path}: not {fmt.encoding} text (bad byte at offset {e.start})") from None
    except csv.Error as e:
        raise EebenchError(f"{path}:{prev + 1}: unreadable {kind.upper()} ({e})") from None
    return _Rows(str(path), "line", out, where, columns)


def _read_jsonl(path: Path, fmt: FileFormat, columns: dict[str, str | int]) -> _Rows:
    out: dict[str, list] = {k: [] for k in columns}
    where: list[int] = []
    for k, c in columns.items():
        if not isinstance(c, str):
            raise EebenchError(f"{path}: JSONL columns are keys, not indices: got {c!r} for {k}")
    try:
        with open(path, encoding=fmt.encoding) as fh:
            for ln, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EebenchError(f"{path}:{ln}: not valid JSON ({e.msg}, column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise EebenchError(f"{path}:{ln}: expected one JSON object per line, found {type(obj).__name__}")
                for k, c in columns.items():
                    if c not in obj:
                        raise EebenchError(f"{path}:{ln}: column {c!r} (for {k}) not found; columns found: "
                                           f"{', '.join(obj)}")
                    out[k].append(obj[c])
                where.append(ln)
    except UnicodeDecodeError as e:
        raise EebenchError(f"{path}: not {fmt.encoding} text (bad byte at offset {e.start})") from None
    return _Rows(str(path), "line", out, where, columns)


def _read_parquet(path: Path, columns: dict[str, str | int]) -> _Rows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise EebenchError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    names = table.column_names
    out = {}
    for k, c in columns.items():
        i = _col_index(path, names, len(names), 1, k, c)
        out[k] = table.column(i).to_pylist()
    return _Rows(str(path), "row", out, list(range(1, table.num_rows + 1)), columns)


def _read_file(path: Path, spec: TaskSpec, split: str) -> _Rows:
    fmt = spec.file_format(split)
    kind = fmt.type or _FORMAT_BY_SUFFIX.get(path.suffix.lower())
    if kind is None:
        raise EebenchError(f"{path}: cannot tell the file format from the suffix {path.suffix!r}; set format.type "
                           f"to one of tsv, csv, jsonl, parquet")
    columns = spec.columns(split)
    only_delimited = sorted({"header", "delimiter", "quoting"} & fmt.model_fields_set)
    if kind in ("jsonl", "parquet") and only_delimited:
        raise EebenchError(f"{path}: format.{', format.'.join(only_delimited)} applies to csv and tsv files only; "
                           f"remove it for this {kind} file (its columns are named by its keys)")
    if kind in ("tsv", "csv"):
        return _read_delimited(path, fmt, kind, columns)
    if kind == "jsonl":
        return _read_jsonl(path, fmt, columns)
    return _read_parquet(path, columns)


def _label_key(v: Any) -> str:
    if isinstance(v, str):
        return v.strip()
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _validate(rows: _Rows, spec: TaskSpec, split: str, label_map: dict[str, int] | None = None) -> dict[str, list]:
    """Checked columns ready for Arrow: the text fields as str, ``label`` as class ids or floats."""
    n = len(rows.where)
    if n == 0:
        raise EebenchError(f"{rows.source}: split {split!r} of task {spec.name!r} is empty (no data rows)")
    out: dict[str, list] = {}
    for f in spec.text_fields:
        vals = rows.cols[f]
        if not all(isinstance(v, str) for v in vals):
            i = next(i for i, v in enumerate(vals) if not isinstance(v, str))
            found = "null" if vals[i] is None else f"{type(vals[i]).__name__} {vals[i]!r}"
            raise EebenchError(f"{rows.loc(i)}: column {rows.names[f]!r} ({f}) should hold text, found {found}")
        out[f] = vals
    raw = rows.cols["label"]
    col = rows.names["label"]
    if spec.is_regression:
        labels = []
        lo, hi = spec.label_range or (-math.inf, math.inf)
        for i, v in enumerate(raw):
            try:
                x = float(v.strip() if isinstance(v, str) else v)
            except (TypeError, ValueError):
                x = math.nan
            if not math.isfinite(x) or isinstance(v, bool):
                raise EebenchError(f"{rows.loc(i)}: label {v!r} (column {col!r}) is not a number; task "
                                   f"{spec.name!r} is a regression task with float labels")
            if not lo <= x <= hi:
                raise EebenchError(f"{rows.loc(i)}: label {x:g} (column {col!r}) is outside the task's label_range "
                                   f"{lo:g}..{hi:g}")
            labels.append(x)
    else:
        lm = label_map if label_map is not None else spec.label_map
        assert lm is not None
        labels = [lm.get(_label_key(v)) for v in raw]
        if None in labels:
            i = labels.index(None)
            raise EebenchError(f"{rows.loc(i)}: label {raw[i]!r} (column {col!r}) is not in the label map of task "
                               f"{spec.name!r}; accepted: {', '.join(lm)}")
    out["label"] = labels
    return out


def _features(spec: TaskSpec):
    from datasets import Features, Value

    return Features({**{f: Value("string") for f in spec.text_fields},
                     "label": Value("float32" if spec.is_regression else "int64")})


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _spec_key(spec: TaskSpec) -> dict:
    return {"text_fields": spec.text_fields, "label_map": spec.label_map, "regression": spec.regression,
            "label_range": spec.label_range}


# --------------------------------------------------------------------------- caching


_SPLITS: OrderedDict[str, Dataset] = OrderedDict()
_TOKENIZED: OrderedDict[str, Dataset] = OrderedDict()
_MEMO_SIZE = 16


def _memo_put(memo: OrderedDict, key: str, value: Any) -> Any:
    memo[key] = value
    memo.move_to_end(key)
    while len(memo) > _MEMO_SIZE:
        memo.popitem(last=False)
    return value


def _cache_root() -> Path:
    env = os.environ.get("HF_DATASETS_CACHE")
    if env:
        return Path(env).expanduser() / "eebench"
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "eebench"


@contextmanager
def _quiet():
    import datasets

    was = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was:
            datasets.enable_progress_bars()


def _cached_split(key: str, build: Callable[[], Dataset]) -> Dataset:
    """The split cached under ``key``: from memory, else from disk, else built (validated) and saved."""
    from datasets import load_from_disk

    if key in _SPLITS:
        _SPLITS.move_to_end(key)
        return _SPLITS[key]
    final = _cache_root() / "splits" / key
    if (final / "state.json").is_file():
        try:
            with _quiet():
                return _memo_put(_SPLITS, key, load_from_disk(str(final)))
        except Exception as e:  # a damaged cache entry: rebuild it
            log.warning("rebuilding the damaged data cache %s (%s)", final, e)
            shutil.rmtree(final, ignore_errors=True)
    ds = build()  # raises on bad input before anything is written
    tmp = final.parent / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        with _quiet():
            ds.save_to_disk(str(tmp))
        try:
            os.rename(tmp, final)
        except OSError:  # another process saved it first
            shutil.rmtree(tmp, ignore_errors=True)
        with _quiet():
            ds = load_from_disk(str(final))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("could not cache %s under %s (%s); keeping it in memory", key, final.parent, e)
    return _memo_put(_SPLITS, key, ds)


def _to_dataset(cols: dict[str, list], spec: TaskSpec, fingerprint: str) -> Dataset:
    import pyarrow as pa
    from datasets import Dataset, DatasetInfo
    from datasets.table import InMemoryTable

    features = _features(spec)
    table = pa.table({k: cols[k] for k in features}, schema=features.arrow_schema)
    return Dataset(InMemoryTable(table), info=DatasetInfo(features=features), fingerprint=fingerprint)


# --------------------------------------------------------------------------- loading


def load_task(name_or_path: str | os.PathLike | TaskSpec, split: str,
              data_dir: str | os.PathLike | None = None) -> Dataset:
    """One split of a task as a ``datasets.Dataset`` with the text field column(s) and ``label``
    (int64 class ids, float32 for regression), in file order.

    Source: ``data_dir`` (a GLUE download or the task's own folder), else ``GLUE_DIR``, else the
    hub. Raises :class:`EebenchError` with one line naming the bad file, line or column.
    """
    spec = get_task(name_or_path)
    if split not in spec.splits:
        raise EebenchError(f"task {spec.name!r} has no split {split!r}; splits: {', '.join(spec.splits)}")
    path = _resolve_file(spec, split, data_dir)
    if path is not None:
        st = path.stat()
        fmt = spec.file_format(split)
        key = _sha({"v": _CACHE_VERSION, "path": str(path.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns,
                    "format": fmt.model_dump(), "columns": spec.columns(split), **_spec_key(spec)})[:32]
        return _cached_split(key, lambda: _to_dataset(_validate(_read_file(path, spec, split), spec, split),
                                                      spec, key))
    return _load_hub(spec, split)


def _load_hub(spec: TaskSpec, split: str) -> Dataset:
    s, hub = spec.splits[split], spec.hub
    if hub is None or s.hub_split is None:
        raise EebenchError(f"split {split!r} of task {spec.name!r} has no hub source; {_local_hint(spec, split)}")
    where = f"{hub.path}" + (f" ({hub.name})" if hub.name else "") + f" split {s.hub_split!r}"
    var = _offline()
    if var:
        raise EebenchError(f"task {spec.name!r} split {split!r} needs the Hugging Face hub ({where}) but {var} is "
                           f"set; {_local_hint(spec, split)}")
    import datasets

    try:
        with _quiet():
            ds = datasets.load_dataset(hub.path, hub.name, split=s.hub_split)
    except Exception as e:  # connection errors come in many classes (requests, httpx, huggingface_hub)
        first = (str(e).splitlines() or [""])[0]
        raise EebenchError(f"could not load {where} from the Hugging Face hub ({type(e).__name__}: {first}); "
                           f"{_local_hint(spec, split)}") from None
    inv = {v: k for k, v in (hub.columns or {}).items()}  # field -> hub column
    names = {f: inv.get(f, f) for f in [*spec.text_fields, "label"]}
    for f, c in names.items():
        if c not in ds.column_names:
            raise EebenchError(f"hub {where}: column {c!r} (for {f}) not found; columns found: "
                               f"{', '.join(ds.column_names)}")
    label_map = None
    feat = ds.features[names["label"]]
    if isinstance(feat, datasets.ClassLabel) and not spec.is_regression:
        if list(feat.names) != list(spec.label_names or []):
            raise EebenchError(f"hub {where}: label names {feat.names} differ from the task's label_names "
                               f"{spec.label_names}")
        label_map = {str(i): i for i in range(spec.num_labels)}  # -1 (unlabelled test rows) is rejected
    key = _sha({"v": _CACHE_VERSION, "hub": hub.model_dump(), "split": s.hub_split, "fp": ds._fingerprint,
                **_spec_key(spec)})[:32]

    def build() -> Dataset:
        raw = ds.select_columns(list(dict.fromkeys(names.values())))[:]
        rows = _Rows(f"hub {where}", "row", {f: raw[c] for f, c in names.items()},
                     list(range(1, len(ds) + 1)), names)
        return _to_dataset(_validate(rows, spec, split, label_map), spec, key)

    return _cached_split(key, build)


def subset(dataset: Dataset, n: int | None, seed: int) -> Dataset:
    """A seeded random subset of ``n`` rows kept in their original order (``n`` None or >= the
    size: the dataset unchanged). For one seed, a smaller subset lies inside a larger one."""
    if n is None or n >= len(dataset):
        return dataset
    if n < 1:
        raise EebenchError(f"the number of samples must be a positive integer, got {n}")
    idx = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:n])
    return dataset.select(idx.tolist())


# --------------------------------------------------------------------------- tokenising


_TOKENIZER_HASHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tokenizer_hash(tokenizer) -> str:
    try:
        return _TOKENIZER_HASHES[tokenizer]
    except (KeyError, TypeError):
        pass
    from datasets.fingerprint import Hasher

    try:
        h = Hasher.hash(tokenizer)
    except Exception:  # an unpicklable tokenizer: no cross-process caching, still correct
        h = uuid.uuid4().hex
    try:
        _TOKENIZER_HASHES[tokenizer] = h
    except TypeError:
        pass
    return h


def tokenize(dataset: Dataset, tokenizer, spec: TaskSpec, max_seq_length: int = 128) -> Dataset:
    """The split as token ids: columns input_ids, attention_mask, token_type_ids (if the tokenizer
    gives them) and label; truncated to ``max_seq_length``, not padded. Cached by fingerprint
    (on disk next to a cached split, in memory otherwise)."""
    need = [*spec.text_fields, "label"]
    missing = [c for c in need if c not in dataset.column_names]
    if missing:
        raise EebenchError(f"dataset has no column {missing[0]!r} (task {spec.name!r} needs {', '.join(need)}); "
                           f"columns found: {', '.join(dataset.column_names)}")
    if max_seq_length < 2:
        raise EebenchError(f"max_seq_length must be at least 2, got {max_seq_length}")
    fields = list(spec.text_fields)
    fp = _sha({"v": _CACHE_VERSION, "data": dataset._fingerprint, "tok": _tokenizer_hash(tokenizer),
               "max": max_seq_length, "fields": fields})[:16]
    if fp in _TOKENIZED:
        _TOKENIZED.move_to_end(fp)
        return _TOKENIZED[fp]

    def encode(batch: dict[str, list]) -> dict:
        return tokenizer(*[batch[f] for f in fields], truncation=True, max_length=max_seq_length)

    out = dataset.map(encode, batched=True, remove_columns=[c for c in dataset.column_names if c != "label"],
                      new_fingerprint=fp, desc=f"Tokenizing {spec.name}")
    keep = [c for c in (*_MODEL_INPUTS, "label") if c in out.column_names]
    if keep != out.column_names:
        out = out.select_columns(keep)
    return _memo_put(_TOKENIZED, fp, out)


# --------------------------------------------------------------------------- batching


class _TokenRows(torch.utils.data.Dataset):
    """Row access for the DataLoader: one Arrow ``take`` per batch, not one per row."""

    def __init__(self, tokenized: Dataset, cols: list[str]):
        self.cols = [*cols, "label"]
        self.ds = tokenized.with_format(None).select_columns(self.cols)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        batch = self.ds[list(indices)]
        return [{**{c: batch[c][j] for c in self.cols}, "index": int(i)} for j, i in enumerate(indices)]

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]


class _Collate:
    """Pads a batch to its longest row with the tokenizer; adds ``labels`` and ``index``."""

    def __init__(self, tokenizer, cols: list[str], regression: bool):
        self.tokenizer, self.cols, self.regression = tokenizer, cols, regression

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        feats = [{c: r[c] for c in self.cols} for r in rows]
        batch = dict(self.tokenizer.pad(feats, padding="longest", return_tensors="pt"))
        batch["labels"] = torch.tensor([r["label"] for r in rows],
                                       dtype=torch.float32 if self.regression else torch.long)
        batch["index"] = torch.tensor([r["index"] for r in rows], dtype=torch.long)
        return batch


class _BatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of row indices: in order, shuffled, or grouped by length. Every pass over it is one
    epoch; epoch ``e`` of seed ``s`` is the same on every run."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, lengths: np.ndarray | None):
        self.n, self.bs, self.shuffle, self.seed, self.lengths = n, batch_size, shuffle, seed, lengths
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(self.n / self.bs)

    def _chunks(self, order: np.ndarray) -> list[list[int]]:
        return [order[i:i + self.bs].tolist() for i in range(0, len(order), self.bs)]

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        lengths = self.lengths
        if lengths is None:
            yield from self._chunks(rng.permutation(self.n) if self.shuffle else np.arange(self.n))
            return
        if not self.shuffle:  # inference: longest first, least padding
            yield from self._chunks(np.argsort(-lengths, kind="stable"))
            return
        # as transformers' LengthGroupedSampler: shuffle, sort by length within mega-batches of
        # up to 50 batches, then (here) shuffle the batch order and put the longest batch first
        # so an out-of-memory shows at once
        perm = rng.permutation(self.n)
        mega = max(1, min(self.n // (self.bs * 4), 50)) * self.bs
        batches: list[list[int]] = []
        for s in range(0, self.n, mega):
            m = perm[s:s + mega]
            batches += self._chunks(m[np.argsort(-lengths[m], kind="stable")])
        batches = [batches[i] for i in rng.permutation(len(batches))]
        longest = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
        batches.insert(0, batches.pop(longest))
        yield from batches


def _lengths(tokenized: Dataset) -> np.ndarray:
    import pyarrow.compute as pc

    col = tokenized.with_format("arrow")["input_ids"]
    return pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64)


def make_loader(tokenized: Dataset, tokenizer, batch_size: int, shuffle: bool = False, seed: int = 0,
                group_by_length: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader of dicts of tensors: input_ids, attention_mask, token_type_ids (if present),
    labels and ``index`` (each row's position in ``tokenized``, to restore order), padded to the
    longest row of each batch. ``group_by_length`` batches rows of similar length (shuffled with
    ``seed`` when ``shuffle``, longest first otherwise); the batch order is fixed by ``seed``."""
    if batch_size < 1:
        raise EebenchError(f"batch size must be a positive integer, got {batch_size}")
    for c in ("input_ids", "label"):
        if c not in tokenized.column_names:
            raise EebenchError(f"tokenized dataset has no column {c!r}; columns found: "
                               f"{', '.join(tokenized.column_names)} (run eebench.data.tasks.tokenize first)")
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise EebenchError(f"tokenizer {type(tokenizer).__name__} has no pad token; set tokenizer.pad_token")
    cols = [c for c in _MODEL_INPUTS if c in tokenized.column_names]
    regression = tokenized.features["label"].dtype.startswith("float")
    lengths = _lengths(tokenized) if group_by_length else None
    sampler = _BatchSampler(len(tokenized), batch_size, shuffle, seed, lengths)
    # A generator of its own: otherwise creating the iterator draws from the global torch RNG,
    # which would shift dropout streams and break bit-exact resume.
    return torch.utils.data.DataLoader(_TokenRows(tokenized, cols), batch_sampler=sampler,
                                       collate_fn=_Collate(tokenizer, cols, regression),
                                       generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- fingerprint


def _hash_array(h, arr) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        vals = arr.to_pylist()
        h.update(b"str")
        h.update(np.array([-1 if v is None else len(v) for v in vals], dtype=np.int64).tobytes())
        h.update("".join(v for v in vals if v is not None).encode("utf-8", "surrogatepass"))
    elif pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_floating(t):
        kind = "float" if pa.types.is_floating(t) else "int"
        h.update(kind.encode())
        h.update(np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), dtype=np.bool_).tobytes())
        vals = arr.fill_null(0).to_numpy(zero_copy_only=False)
        h.update(np.asarray(vals, dtype=np.float64 if kind == "float" else np.int64).tobytes())
    elif pa.types.is_list(t) or pa.types.is_large_list(t):
        h.update(b"list")
        h.update(np.asarray(pc.list_value_length(arr).fill_null(-1).to_numpy(zero_copy_only=False),
                            dtype=np.int64).tobytes())
        _hash_array(h, pc.list_flatten(arr))
    else:
        h.update(json.dumps(arr.to_pylist(), sort_keys=True, default=str).encode())


def data_fingerprint(dataset: Dataset) -> str:
    """A sha256 of the dataset's content (column names, rows in order; not the storage types or
    where it was read from), the same in every process: for the results JSON."""
    h = hashlib.sha256()
    cols = sorted(dataset.column_names)
    h.update(json.dumps({"rows": len(dataset), "columns": cols}).encode())
    view = dataset.with_format("arrow")
    step = 50_000
    for start in range(0, len(dataset), step):
        table = view[start:start + step]
        for c in cols:
            h.update(c.encode())
            _hash_array(h, table.column(c).combine_chunks())
    return h.hexdigest()
