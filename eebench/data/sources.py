"""Where a split comes from and how it is read: the ``data_dir`` argument (``--data-dir``), else the
``GLUE_DIR`` environment variable (the original GLUE layout ``GLUE_DIR/<Folder>/<file>``), else
the Hugging Face hub. Local files are read and validated here (quoting off for GLUE TSVs, BOMs
stripped, labels mapped) before anything is written, so bad input raises one
:class:`~eebench.errors.EebenchError` and leaves no files behind. Validated splits are cached as
Arrow under ``$HF_DATASETS_CACHE/eebench`` so the next load (and the tokenised copy, which
``datasets`` caches next to it) is fast. Also: seeded subsets.
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
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from eebench.data.tasks import _CACHE_VERSION, _FORMAT_BY_SUFFIX, FileFormat, TaskSpec, get_task
from eebench.errors import EebenchError

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger(__name__)


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
