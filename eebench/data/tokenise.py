"""Tokenising (cached by fingerprint), length-grouped batches with dynamic padding, and the
data fingerprint recorded in every result.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from eebench.data.sources import _TOKENIZED, _memo_put, _sha
from eebench.data.tasks import _CACHE_VERSION, _MODEL_INPUTS, TaskSpec
from eebench.errors import EebenchError

if TYPE_CHECKING:
    from datasets import Dataset

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
                               f"{', '.join(tokenized.column_names)} (run eebench.data.tokenize first)")
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
