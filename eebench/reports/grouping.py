"""Which cells may be averaged together: one function for every table, plot and analysis.

Cells belong to one group exactly when their identities (``CellResult.config``: the fully
resolved configuration, data fingerprints and maths version) are equal but for the seed. A group
is labelled by its method plus what sets it apart: method hyper-parameters that differ from the
method's defaults (``cosee (alpha=0.01)``), a layer budget (``final-only (3 of 6 layers)``), and
any other setting that differs between the groups of one task (pooling, model, epochs, ...).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eebench.errors import EebenchError
from eebench.runs.plots import _method_order
from eebench.runs.results import CellResult

#: Keys of an identity that never go into a label: the group's method and task are shown
#: elsewhere; row counts follow from the sample settings; depth is shown as "K of M layers".
_NOT_LABELLED = {"method", "task", "seed", "method_params", "num_layers", "backbone_layers", "train_rows",
                 "dev_rows", "train_fingerprint", "dev_fingerprint"}
#: Order in which differing settings are named in a label (the rest follow alphabetically).
_LABEL_ORDER = ["model", "pooling", "final_pooling", "epochs", "lr", "head_lr", "batch_size", "micro_batch_size",
                "train_samples", "train_subset", "eval_samples", "max_seq_length", "precision", "group_by_length"]


@dataclass
class CellGroup:
    """Cells of one configuration (one task), differing only in their seed."""

    task: str
    key: str  # canonical JSON of the identity without the seed
    identity: dict[str, Any]
    label: str = ""
    cells: list[CellResult] = field(default_factory=list)

    @property
    def method(self) -> str:
        return str(self.identity.get("method"))

    @property
    def seeds(self) -> list[int]:
        return sorted(r.seed for r in self.cells)


def cell_identity(r: CellResult) -> dict[str, Any]:
    """A cell's identity without its seed. Results written before identities were complete (no
    ``maths_version``) get what they recorded elsewhere: the pooling, head lr and layers the model
    really used and the data fingerprints; their maths version is unknown (None)."""
    ident = dict(r.config)
    if "maths_version" not in ident:
        m, d = r.model, r.data
        ident.update({"maths_version": None, "pooling": m.get("pooling"), "final_pooling": m.get("final_pooling"),
                      "head_lr": m.get("head_lr"), "num_layers": m.get("num_layers"),
                      "backbone_layers": m.get("backbone_layers"), "train_fingerprint": d.get("train_fingerprint"),
                      "dev_fingerprint": d.get("dev_fingerprint"), "train_rows": d.get("train_rows"),
                      "dev_rows": d.get("dev_rows")})
        if r.training.get("hparams"):
            ident["method_params"] = dict(r.training["hparams"])
    ident.pop("seed", None)
    ident.setdefault("method", r.method)
    ident.setdefault("task", r.task)
    return ident


def _show(k: str, v: Any) -> str:
    if k == "model" and isinstance(v, str) and ("/" in v or "\\" in v):
        v = Path(v).name or v  # a local path: its folder name
    return f"{k}={v}"


_NONE = object()


def _j(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def _reference(key: str, values: list[Any]) -> Any:
    """The value of ``key`` a row's label need not name: eebench's default when some row uses it,
    else the value most rows share (none when that is a tie: then every row names its value)."""
    from eebench.runs.config import RunConfig

    seen = [_j(v) for v in values]
    field_ = RunConfig.model_fields.get(key)
    if field_ is not None and field_.default_factory is None and _j(field_.default) in seen:
        return _j(field_.default)
    counts = sorted(((seen.count(v), v) for v in set(seen)), reverse=True)
    if len(counts) > 1 and counts[0][0] == counts[1][0]:
        return _NONE
    return counts[0][1]


def _method_defaults(method: str) -> dict[str, Any] | None:
    from eebench.strategy import get_method

    try:
        return dict(get_method(method).defaults)
    except (KeyError, ValueError):
        return None  # a method this installation does not know: show every hyper-parameter that differs


def _labels(groups: list[CellGroup]) -> None:
    idents = [g.identity for g in groups]
    keys = sorted({k for i in idents for k in i} - _NOT_LABELLED,
                  key=lambda k: (_LABEL_ORDER.index(k) if k in _LABEL_ORDER else len(_LABEL_ORDER), k))
    varying = [k for k in keys if len({_j(i.get(k)) for i in idents}) > 1]
    reference = {k: _reference(k, [i.get(k) for i in idents]) for k in varying}
    params_by_method: dict[str, list[dict]] = {}
    for i in idents:
        params_by_method.setdefault(str(i.get("method")), []).append(i.get("method_params") or {})
    for g in groups:
        i = g.identity
        parts = []
        params = i.get("method_params") or {}
        defaults = _method_defaults(g.method)
        for k, v in params.items():
            if defaults is None:
                others = params_by_method[g.method]
                if len({json.dumps(p.get(k), default=str) for p in others}) > 1:
                    parts.append(f"{k}={v}")
            elif k not in defaults or defaults[k] != v:
                parts.append(f"{k}={v}")
        k_layers, total = i.get("num_layers"), i.get("backbone_layers")
        if k_layers and total and k_layers != total:
            parts.append(f"{k_layers} of {total} layers")
        for k in varying:
            if reference[k] is not _NONE and _j(i.get(k)) == reference[k]:
                continue  # the usual value of this table (the default, else the one most rows share)
            if (k == "head_lr" and i.get("head_lr") == i.get("lr")) or (
                    k == "final_pooling" and i.get("final_pooling") == i.get("pooling")):
                continue  # the defaults: the exit heads learn at --lr, the final head pools as the others
            parts.append(_show(k, i.get(k)))
        shown = set(varying)
        for fp, explained_by, what in (("train_fingerprint", ("train_samples", "train_subset"), "train data"),
                                       ("dev_fingerprint", ("eval_samples",), "dev data")):
            if len({x.get(fp) for x in idents}) > 1 and not shown & set(explained_by):
                parts.append(f"{what} {str(i.get(fp))[:8]}")
        g.label = g.method + (f" ({', '.join(parts)})" if parts else "")
    seen: dict[str, int] = {}
    for g in groups:
        seen[g.label] = seen.get(g.label, 0) + 1
    for g in groups:
        if seen[g.label] > 1:  # differing only in keys no label names: name the identity itself
            g.label += f" #{hashlib.sha256(g.key.encode()).hexdigest()[:8]}"


def group_cells(results: list[CellResult]) -> list[CellGroup]:
    """Cells grouped by configuration identity (all but the seed), per task, labelled.

    Groups come sorted by task, then method (reference rows first), then label. Raises
    EebenchError when the cells of one task were evaluated on different dev sets that no setting
    explains (two tasks sharing one name, or data files that changed), since their numbers
    cannot sit in one table, and when one group would hold two cells of one seed."""
    by_key: dict[tuple[str, str], CellGroup] = {}
    for r in results:
        ident = cell_identity(r)
        key = json.dumps(ident, sort_keys=True, default=str)
        g = by_key.setdefault((r.task, key), CellGroup(task=r.task, key=key, identity=ident))
        if any(c.seed == r.seed for c in g.cells):
            raise EebenchError(f"two results of task {r.task!r}, method {r.method!r}, seed {r.seed} share one "
                               f"configuration (cells {g.cells[0].cell_id} and {r.cell_id}); report one of them")
        g.cells.append(r)
    groups = list(by_key.values())
    for task in {g.task for g in groups}:
        tg = [g for g in groups if g.task == task]
        devs: dict[Any, set] = {}
        for g in tg:
            devs.setdefault(g.identity.get("dev_fingerprint"), set()).add(
                json.dumps([g.identity.get("eval_samples"), g.identity.get("eval_split")], default=str))
        # Different dev sets are fine when a setting says why (another --eval-samples); otherwise
        # one table would compare numbers measured on different data.
        if len(devs) > 1 and len(set().union(*devs.values())) < len(devs):
            sources = sorted({str(c.data.get("task_source", c.task)) for g in tg for c in g.cells})
            raise EebenchError(
                f"cells of task {task!r} were evaluated on {len(devs)} different dev sets "
                f"(fingerprints {', '.join(sorted(str(f)[:8] for f in devs))}; task sources {', '.join(sources)}) "
                "that no setting explains; their numbers cannot share a table: report each results folder "
                "on its own (--results DIR)")
        _labels(tg)
    return sorted(groups, key=lambda g: (g.task, _method_order(g.method), g.label))


__all__ = ["CellGroup", "cell_identity", "group_cells"]
