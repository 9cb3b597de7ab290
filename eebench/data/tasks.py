"""Task specs: a task is data, not code. One YAML file (``tasks/*.yaml``, or a user's own) names
the hub source, the GLUE_DIR folder, the files of each split and their column layout, the text
fields, the label map and the metrics. A user's own task is one more YAML file pointing at CSV /
TSV / JSONL / parquet files. Where a split comes from and how it is read: ``sources``; tokenising
and batching: ``tokenise``."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, field_validator, model_validator

from eebench.data.metrics import METRICS
from eebench.errors import EebenchError, UnknownNameError

if TYPE_CHECKING:
    pass


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


