"""True early-exit inference and its wall-clock measurement.

``EarlyExitEngine`` runs a trained ``MultiExitModel`` layer by layer with one exit signal and one
threshold, in three modes that all give the exit layers and predictions of the one-pass simulation
(``eebench.exits.simulate_exits``) up to float noise:

* ``single``: one input at a time, no padding (the latency setting);
* ``batched``: fixed batches (in input order, or shortest first with ``sort_by_length``); exited
  samples leave the batch after every layer and padding columns only they needed are trimmed;
* ``streaming``: the batch is kept full by refilling it with waiting inputs as others exit; every
  sample keeps its own layer position, hidden states and length.

Every mode drives the model's one ``LayerStepper`` (embed -> layer -> exit head) and asks an exit
policy (``eebench.policies``: a signal + threshold, or a method's own rule such as BERxiT's LTE or
PALBERT's Q-exit) after every layer through its incremental form; the maths lives in
``eebench.signals`` / ``eebench.policies`` and ``eebench.exits``. ``bench`` measures latency and throughput of every mode
against the full model (all layers, final head only) and returns a JSON-ready dict;
``format_bench`` renders it as a markdown table.
"""

from __future__ import annotations

import math
import operator
import platform
import statistics
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from eebench.accel import autocast, machine_info, resolve_precision
from eebench.errors import EebenchError
from eebench.exits import exit_layers_from_scores, predictions_at_exit
from eebench.metrics import exit_counts, speedup_ratio, speedup_ratios
from eebench.models import MultiExitModel, select_state
from eebench.policies import ExitPolicy, SignalPolicy, get_policy
from eebench.signals import Signal

MODES = ("single", "batched", "streaming")

#: ``on_layer(layer, indices)``: called before a layer runs, with the 1-based layer and the input
#: positions of the samples about to run it (so ``len(indices)`` is the batch size).
LayerCallback = Callable[[int, list[int]], None]


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Example:
    """One tokenised input as 1-D tensors, trailing padding removed."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def prepare_examples(examples, device: str | torch.device = "cpu") -> list[Example]:
    """Normalise inputs to a list of ``Example`` on ``device``.

    Accepts a list of dicts (``input_ids``, optional ``attention_mask`` / ``token_type_ids`` as
    lists or 1-D tensors), a padded batch (dict of [N, L] tensors or lists) or a list of
    ``Example``. Trailing padding (columns after a row's last attended token) is cut, so a row
    keeps its positions exactly as in the padded batch.
    """
    device = torch.device(device)
    if isinstance(examples, Mapping):
        ids = torch.as_tensor(examples["input_ids"])
        if ids.dim() != 2:
            raise EebenchError(f"a padded batch needs input_ids of shape [N, L], got {tuple(ids.shape)}")
        cols = {k: torch.as_tensor(v) for k, v in examples.items() if k in ("attention_mask", "token_type_ids")}
        examples = [{"input_ids": ids[i], **{k: v[i] for k, v in cols.items()}} for i in range(ids.shape[0])]
    out = []
    for n, ex in enumerate(examples):
        if isinstance(ex, Example):
            out.append(ex if ex.input_ids.device == device else Example(
                ex.input_ids.to(device), ex.attention_mask.to(device),
                None if ex.token_type_ids is None else ex.token_type_ids.to(device)))
            continue
        ids = torch.as_tensor(ex["input_ids"], dtype=torch.long).reshape(-1)
        mask = ex.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask, dtype=torch.long).reshape(-1)
        tt = ex.get("token_type_ids")
        tt = None if tt is None else torch.as_tensor(tt, dtype=torch.long).reshape(-1)
        if mask.shape != ids.shape or (tt is not None and tt.shape != ids.shape):
            raise EebenchError(f"input {n}: input_ids, attention_mask and token_type_ids differ in length")
        on = mask.nonzero()
        if on.numel() == 0:
            raise EebenchError(f"input {n} has no attended token (attention_mask is all zero)")
        length = int(on.max()) + 1
        out.append(Example(ids[:length].to(device), mask[:length].to(device),
                           None if tt is None else tt[:length].to(device)))
    if not out:
        raise EebenchError("no inputs to run")
    if len({e.token_type_ids is None for e in out}) > 1:
        raise EebenchError("some inputs have token_type_ids and others not: give them to all or none")
    return out


def collate(examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Right-pad a group of examples: (input_ids, attention_mask, token_type_ids or None), [B, L]."""
    ids = pad_sequence([e.input_ids for e in examples], batch_first=True)
    mask = pad_sequence([e.attention_mask for e in examples], batch_first=True)
    tt = None
    if examples[0].token_type_ids is not None:
        tt = pad_sequence([e.token_type_ids for e in examples], batch_first=True)
    return ids, mask, tt


# --------------------------------------------------------------------------- the engine


@dataclass
class EngineOutput:
    """Per-input results in input order."""

    exit_layers: torch.Tensor  # [N] long, 1-based
    predictions: torch.Tensor  # [N] long
    logits: torch.Tensor  # [N, C] float32, logits of the exit layer

    def speedup(self, num_layers: int) -> float:
        """Layer speed-up (docs/methods.md, Eq. 12) of these exit layers."""
        return speedup_ratio(self.exit_layers, num_layers)


@dataclass
class _Slot:
    """A streaming sample between layers: its own unpadded states and exit-policy state."""

    index: int
    hidden: torch.Tensor  # [L, H]
    mask: torch.Tensor  # [L]
    pstate: tuple | None  # the policy's state for this sample (row of every state tensor)


_PY_COMPARE = {(False, True): operator.lt, (False, False): operator.le, (True, True): operator.gt,
               (True, False): operator.ge}


class EarlyExitEngine:
    """Early-exit inference with one exit policy and threshold on a ``MultiExitModel``.

    ``signal``: a signal name / object or an ``ExitPolicy`` (a method's policy by name, e.g.
    ``lte``, when the model carries that method's modules). ``run`` returns, in input order, the
    exit layer, prediction and exit logits of every input; all modes reproduce ``simulate_exits``
    on the model's one-pass output. The model is put in eval mode (and on ``device``); everything
    runs under ``torch.inference_mode``.
    """

    def __init__(self, model: MultiExitModel, signal: str | Signal | ExitPolicy, threshold: float,
                 device: str | torch.device = "cpu", precision: str = "fp32"):
        self.device = torch.device(device)
        #: The precision that runs: bf16 autocast only on CUDA or a CPU with native bf16 (else
        #: fp32 and a warning line); exit decisions are always taken on float32 logits.
        self.precision, note = resolve_precision(precision, self.device, "inference")
        if note:
            print(f"warning: {note}", flush=True)
        self.model = model.to(self.device).eval()
        self.policy = get_policy(signal, model=self.model)
        self.policy.check_task(model.config.num_labels)
        self.signal = self.policy.signal if isinstance(self.policy, SignalPolicy) else self.policy
        self.threshold = float(threshold)
        self.num_layers = model.num_layers
        self.num_labels = model.config.num_labels
        # Compared in float64, exactly as eebench.exits.exit_layers_from_scores does.
        self._thr = torch.tensor(self.threshold, dtype=torch.float64, device=self.device)
        stepper = model.stepper
        self._embed, self._layer, self._restate = stepper.embed, stepper.layer, stepper.restate
        # Precomputed per-exit head functions: no module dispatch or dropout check per layer.
        self._head_fns = stepper.eval_heads()
        self._step = self.policy.step
        self._meets = self.policy.meets
        # Batch size 1 compares one Python float (float64, as the tensor comparison) unless the
        # policy brings its own ``meets``.
        default_meets = type(self.policy).meets is ExitPolicy.meets or (
            isinstance(self.policy, SignalPolicy) and type(self.policy.signal).meets is Signal.meets)
        self._py_meets = _PY_COMPARE[(self.policy.higher_is_easier, self.policy.strict)] if default_meets else None

    # -- public ----------------------------------------------------------------------
    def run(self, examples, mode: str = "single", batch_size: int = 32,
            on_layer: LayerCallback | None = None, sort_by_length: bool = False) -> EngineOutput:
        """Early-exit inference over ``examples`` (see ``prepare_examples``) in ``mode``.

        ``sort_by_length`` feeds batched / streaming modes shortest first (less padding); the
        output is in input order either way.
        """
        if mode not in MODES:
            raise EebenchError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
        items = self._items(examples)
        b = _check_batch(batch_size)
        if mode == "single" or not sort_by_length:
            return self._dispatch(items, mode, b, on_layer)
        return self._sorted(items, lambda its, cb: self._dispatch(its, mode, b, cb), on_layer)

    def run_full(self, examples, batch_size: int = 1, on_layer: LayerCallback | None = None,
                 sort_by_length: bool = False) -> EngineOutput:
        """The full-model baseline: every layer, then the final head only (no exit computation).

        ``batch_size`` 1 runs one unpadded input at a time; larger sizes use the same batches as
        ``run(mode="batched")`` with the same ``sort_by_length``.
        """
        items = self._items(examples)
        b = _check_batch(batch_size)
        if b == 1 or not sort_by_length:
            return self._full(items, b, on_layer)
        return self._sorted(items, lambda its, cb: self._full(its, b, cb), on_layer)

    # -- pieces ------------------------------------------------------------------------
    def _dispatch(self, items: list[Example], mode: str, b: int, on_layer) -> EngineOutput:
        with torch.inference_mode(), autocast(self.device, self.precision):
            if mode == "single":
                return self._single(items, on_layer)
            if mode == "batched":
                return self._batched(items, b, on_layer)
            return self._streaming(items, b, on_layer)

    @staticmethod
    def _sorted(items: list[Example], fn, on_layer) -> EngineOutput:
        """Run ``fn`` on the items sorted by length (stable), report and return in input order."""
        order = sorted(range(len(items)), key=lambda k: len(items[k]))
        cb = None if on_layer is None else (lambda layer, idx: on_layer(layer, [order[k] for k in idx]))
        out = fn([items[k] for k in order], cb)
        inv = torch.empty(len(order), dtype=torch.long)
        inv[torch.tensor(order)] = torch.arange(len(order))
        return EngineOutput(out.exit_layers[inv], out.predictions[inv], out.logits[inv])

    def _full(self, items: list[Example], b: int, on_layer) -> EngineOutput:
        m = self.num_layers
        embed, layer, final = self._embed, self._layer, self._head_fns[m - 1]
        logits_out = []
        with torch.inference_mode(), autocast(self.device, self.precision):
            for start in range(0, len(items), b):
                group = items[start:start + b]
                ids, mask, tt = collate(group) if b > 1 else _unbatched(group[0])
                hidden, state = embed(ids, mask, tt)
                for i in range(m):
                    if on_layer is not None:
                        on_layer(i + 1, list(range(start, start + len(group))))
                    hidden = layer(i, hidden, state)
                logits_out.append(final(hidden, mask.to(hidden.dtype) if b > 1 else None)[1])
        return _output([m] * len(items), logits_out)

    def _items(self, examples) -> list[Example]:
        if isinstance(examples, list) and examples and all(isinstance(e, Example) for e in examples) \
                and all(e.input_ids.device == self.device for e in examples):
            return examples
        return prepare_examples(examples, self.device)

    def _leave(self, layer: int, logits: torch.Tensor, features: torch.Tensor, pstate):
        """Exit decisions [n] (compared in float64, as the sweep does) and the policy state."""
        scores, pstate = self._step(layer, logits, features, pstate)
        return self._meets(scores.double(), self._thr), pstate

    def _leave_one(self, layer: int, logits: torch.Tensor, features: torch.Tensor, pstate):
        """Batch size 1: the decision as a Python bool. The value is read once and compared as a
        Python float (float64), which is exactly the tensor comparison with fewer kernels."""
        scores, pstate = self._step(layer, logits, features, pstate)
        if self._py_meets is not None:
            return self._py_meets(float(scores), self.threshold), pstate
        return bool(self._meets(scores.double(), self._thr)), pstate

    def _single(self, items: list[Example], on_layer) -> EngineOutput:
        m = self.num_layers
        embed, layer, heads, step = self._embed, self._layer, self._head_fns, self._step
        cmp, thr = self._py_meets, self.threshold
        begin = self.policy.begin
        layers, logits_out = [], []
        for j, ex in enumerate(items):
            ids, mask, tt = _unbatched(ex)
            hidden, state = embed(ids, mask, tt)
            pstate = begin()
            for i in range(m):
                if on_layer is not None:
                    on_layer(i + 1, [j])
                hidden = layer(i, hidden, state)
                feats, logits = heads[i](hidden, None)  # one unpadded input: pool over every token
                if i == m - 1:
                    break
                if cmp is not None:  # the hot path, inlined
                    scores, pstate = step(i, logits, feats, pstate)
                    if cmp(float(scores), thr):
                        break
                else:
                    leave, pstate = self._leave_one(i, logits, feats, pstate)
                    if leave:
                        break
            layers.append(i + 1)
            logits_out.append(logits)
        return _output(layers, logits_out)

    def _batched(self, items: list[Example], b: int, on_layer) -> EngineOutput:
        n, m = len(items), self.num_layers
        embed, layer, heads = self._embed, self._layer, self._head_fns
        exit_layer = torch.full((n,), m, dtype=torch.long)
        exit_logits = torch.zeros(n, self.num_labels)
        lengths_all = torch.tensor([len(e) for e in items])
        for start in range(0, n, b):
            group = items[start:start + b]
            ids, mask, tt = collate(group)
            hidden, state = embed(ids, mask, tt)
            hmask = mask.to(hidden.dtype)
            alive = torch.arange(start, start + len(group))
            lengths = lengths_all[start:start + len(group)]
            pstate = self.policy.begin()
            for i in range(m):
                if on_layer is not None:
                    on_layer(i + 1, alive.tolist())
                hidden = layer(i, hidden, state)
                feats, logits = heads[i](hidden, hmask)
                if i == m - 1:
                    exit_logits[alive] = logits.float().cpu()
                    break
                leave, pstate = self._leave(i, logits, feats, pstate)
                leave = leave.cpu()
                if not leave.any():
                    continue
                gone = alive[leave]
                exit_layer[gone] = i + 1
                exit_logits[gone] = logits[leave.to(logits.device)].float().cpu()
                stay = (~leave).nonzero().squeeze(1)
                if stay.numel() == 0:
                    break
                alive, lengths = alive[stay], lengths[stay]
                stay_d = stay.to(self.device)
                hidden, mask, hmask = hidden[stay_d], mask[stay_d], hmask[stay_d]
                if pstate is not None:
                    pstate = tuple(t[stay_d] for t in pstate)
                width = int(lengths.max())
                if width < hidden.shape[1]:
                    # The longest samples have left: drop the padding columns nobody needs any more.
                    hidden, mask, hmask = hidden[:, :width], mask[:, :width], hmask[:, :width]
                    state = self._restate(hidden, mask)
                else:
                    state = select_state(state, stay_d)
        return EngineOutput(exit_layer, exit_logits.argmax(-1), exit_logits)

    def _streaming(self, items: list[Example], b: int, on_layer) -> EngineOutput:
        """Per-layer queues of in-flight samples; every step runs one layer on a full batch.

        Each step runs the deepest layer that has a full batch waiting; when none has, ``b`` new
        inputs are embedded and run through layer 1; once the inputs are exhausted the queues are
        drained shallowest first (so stragglers merge into larger batches at deeper layers).
        A queue holding more than ``b`` sends its shortest samples first (less padding); every
        queue stays below 2 * ``b`` samples.
        """
        n, m = len(items), self.num_layers
        embed, run_layer, heads = self._embed, self._layer, self._head_fns
        queues: list[deque[_Slot]] = [deque() for _ in range(m)]
        exit_layer = [m] * n
        exit_logits: list[torch.Tensor | None] = [None] * n
        lengths = [len(e) for e in items]
        next_input = 0
        while True:
            layer = next((k for k in range(m - 1, 0, -1) if len(queues[k]) >= b), None)
            if layer is None and next_input < n:
                group_items = items[next_input:next_input + b]
                index = list(range(next_input, next_input + len(group_items)))
                next_input += len(group_items)
                ids, mask, tt = collate(group_items)
                hidden, state = embed(ids, mask, tt)
                pstate = self.policy.begin()
                layer = 0
            else:
                if layer is None:
                    layer = next((k for k in range(m) if queues[k]), None)
                    if layer is None:
                        break
                q = queues[layer]
                if len(q) > b:  # the shortest go first: similar lengths pad less
                    ranked = sorted(q, key=lambda slot: slot.hidden.shape[0])
                    slots = ranked[:b]
                    q.clear()
                    q.extend(ranked[b:])
                else:
                    slots = list(q)
                    q.clear()
                index = [s.index for s in slots]
                hidden = pad_sequence([s.hidden for s in slots], batch_first=True)
                mask = pad_sequence([s.mask for s in slots], batch_first=True)
                pstate = None if slots[0].pstate is None else tuple(
                    torch.stack(parts) for parts in zip(*(s.pstate for s in slots), strict=True))
                state = self._restate(hidden, mask)
            if on_layer is not None:
                on_layer(layer + 1, index)
            hidden = run_layer(layer, hidden, state)
            feats, logits = heads[layer](hidden, mask.to(hidden.dtype))
            if layer == m - 1:
                for j, k in enumerate(index):
                    exit_logits[k] = logits[j]
                continue
            leave, pstate = self._leave(layer, logits, feats, pstate)
            nxt = queues[layer + 1]
            for j, (k, gone) in enumerate(zip(index, leave.tolist(), strict=True)):
                if gone:
                    exit_layer[k] = layer + 1
                    exit_logits[k] = logits[j]
                else:
                    length = lengths[k]
                    nxt.append(_Slot(k, hidden[j, :length], mask[j, :length],
                                     None if pstate is None else tuple(t[j] for t in pstate)))
        logits = torch.stack(exit_logits).float().cpu()
        return EngineOutput(torch.tensor(exit_layer, dtype=torch.long), logits.argmax(-1), logits)


def _check_batch(batch_size: int) -> int:
    if int(batch_size) < 1:
        raise EebenchError(f"batch size must be at least 1, got {batch_size}")
    return int(batch_size)


def _unbatched(ex: Example) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One example as a batch of one, [1, L]."""
    return ex.input_ids[None], ex.attention_mask[None], None if ex.token_type_ids is None else ex.token_type_ids[None]


def _output(layers: list[int], logits: list[torch.Tensor]) -> EngineOutput:
    lg = torch.cat(logits).float().cpu()
    return EngineOutput(torch.tensor(layers, dtype=torch.long), lg.argmax(-1), lg)


def early_exit(model: MultiExitModel, input_ids, attention_mask, policy, threshold: float, token_type_ids=None,
               on_layer: LayerCallback | None = None):
    """True early exit on one padded batch: layer by layer, samples that exit leave the batch.

    ``policy``: a signal name / object or an ``ExitPolicy``. Returns (exit layers [N] 1-based,
    predictions [N], logits at exit [N, C]); the engine's batched mode over the whole batch.
    ``on_layer(layer, indices)`` is called before each layer with the rows about to run it.
    """
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_type_ids is not None:
        batch["token_type_ids"] = token_type_ids
    engine = EarlyExitEngine(model, policy, threshold, device=input_ids.device)
    out = engine.run(batch, mode="batched", batch_size=max(1, input_ids.shape[0]), on_layer=on_layer)
    return out.exit_layers, out.predictions, out.logits


# --------------------------------------------------------------------------- thresholds


@dataclass(frozen=True)
class ThresholdChoice:
    """A threshold, the layer speed-up it gives on the logits it was chosen from, and its
    distance to the nearest observed signal value (a safety margin against float noise)."""

    threshold: float
    layer_speedup: float
    margin: float


def one_pass_logits(model: MultiExitModel, examples, batch_size: int = 32,
                    device: str | torch.device = "cpu", precision: str = "fp32") -> torch.Tensor:
    """Logits of every exit, [N, M, C] float32, from ``model.forward`` in input-order batches
    (``precision``: as resolved by ``eebench.accel.resolve_precision``)."""
    items = prepare_examples(examples, device)
    model = model.to(device).eval()
    out = []
    with torch.inference_mode(), autocast(device, precision):
        for start in range(0, len(items), batch_size):
            ids, mask, tt = collate(items[start:start + batch_size])
            out.append(model(ids, mask, tt).logits.float().cpu())
    return torch.cat(out)


def one_pass_scores(model: MultiExitModel, examples, policy: str | Signal | ExitPolicy, batch_size: int = 32,
                    device: str | torch.device = "cpu", precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, M, C] float32, the policy's values [N, M] float64) from ``model.forward`` in
    input-order batches: what the simulation of any threshold needs."""
    items = prepare_examples(examples, device)
    model = model.to(device).eval()
    pol = get_policy(policy, model=model)
    logits, scores = [], []
    with torch.inference_mode(), autocast(device, precision):
        for start in range(0, len(items), batch_size):
            ids, mask, tt = collate(items[start:start + batch_size])
            out = model(ids, mask, tt)
            logits.append(out.logits.float().cpu())
            scores.append(pol.scores(out).double().cpu())
    return torch.cat(logits), torch.cat(scores)


def pick_threshold(layer_logits: torch.Tensor, signal: str | Signal | ExitPolicy, target_speedup: float,
                   tolerance: float = 0.02, scores: torch.Tensor | None = None) -> ThresholdChoice:
    """The threshold whose simulated layer speed-up on ``layer_logits`` [N, M, C] is closest to
    ``target_speedup``; among those within ``tolerance`` (relative) of the closest, the one
    farthest from any observed value. Candidates sit midway between observed values. A policy
    with a fixed operating point returns that threshold and the speed-up it reaches.
    ``scores`` [N, M]: the policy's values when they do not come from the logits alone."""
    sig = get_policy(signal)
    if scores is None:
        scores = sig.scores(layer_logits)
    m = scores.shape[-1]
    fixed = getattr(sig, "fixed_threshold", None)
    if fixed is not None:  # nothing to choose: the one operating point, at whatever speed-up it reaches
        el = exit_layers_from_scores(scores, sig, [fixed])
        inner = scores[:, : m - 1].double()
        margin = float((inner - fixed).abs().min()) if inner.numel() else float("inf")
        return ThresholdChoice(float(fixed), float(speedup_ratios(el, m)[0]), margin)
    if sig.integer:
        cands = torch.arange(1, max(m, 2), dtype=torch.float64)
        margins = torch.full_like(cands, 0.5)
    else:
        vals = torch.unique(scores[:, : m - 1].reshape(-1).double())  # sorted
        if vals.numel() == 0:
            raise EebenchError("a one-layer model has no internal exit to choose a threshold for")
        gaps = vals[1:] - vals[:-1]
        span = float(vals[-1] - vals[0]) or 1.0
        cands = torch.cat([vals[:1] - 1e-3 * span, (vals[1:] + vals[:-1]) / 2, vals[-1:] + 1e-3 * span])
        margins = torch.cat([torch.tensor([1e-3 * span]), gaps / 2, torch.tensor([1e-3 * span])])
        if cands.numel() > 4096:  # keep the sweep small; prefer the widest gaps in each stretch
            keep = torch.linspace(0, cands.numel() - 1, 4096).round().long().unique()
            cands, margins = cands[keep], margins[keep]
    el = exit_layers_from_scores(scores, sig, cands)
    speedups = speedup_ratios(el, m)
    err = (speedups - target_speedup).abs()
    ok = err <= err.min() + tolerance * target_speedup
    best = int(torch.where(ok, margins, torch.full_like(margins, -1.0)).argmax())
    return ThresholdChoice(float(cands[best]), float(speedups[best]), float(margins[best]))


# --------------------------------------------------------------------------- measurement


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {"min": float(min(values)), "median": float(statistics.median(values)), "max": float(max(values))}


def _quantile(sorted_vals: list[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted list."""
    pos = q * (len(sorted_vals) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def signal_overhead(engine: EarlyExitEngine, examples, repeats: int = 3) -> dict:
    """At batch size 1, time each internal layer, its exit head (pooling + classifier) and the
    signal + exit decision, summed over ``examples`` and the internal layers (nobody exits:
    every layer is measured).

    Returns ``layer_ms``, ``head_ms`` and ``signal_ms`` (mean per internal layer), ``fraction``
    (signal / layer: the cost of deciding) and ``head_fraction`` ((head + signal) / layer:
    everything early exit adds to a layer), each as min / median / max over ``repeats``.
    """
    items = engine._items(examples)
    embed, layer, heads, m = engine._embed, engine._layer, engine._head_fns, engine.num_layers
    clock, dev = time.perf_counter, engine.device
    fr, hfr, lt, ht, st = [], [], [], [], []
    if m < 2:
        return {"layer_ms": None, "head_ms": None, "signal_ms": None, "fraction": None, "head_fraction": None}
    with torch.inference_mode(), autocast(dev, engine.precision):
        for _ in range(max(1, repeats)):
            t_layer = t_head = t_sig = 0.0
            for ex in items:
                ids, mask, tt = _unbatched(ex)
                hidden, state = embed(ids, mask, tt)
                pstate = engine.policy.begin()
                for i in range(m - 1):
                    t0 = clock()
                    hidden = layer(i, hidden, state)
                    _sync(dev)
                    t1 = clock()
                    feats, logits = heads[i](hidden, None)
                    _sync(dev)
                    t2 = clock()
                    _, pstate = engine._leave_one(i, logits, feats, pstate)
                    t3 = clock()
                    t_layer += t1 - t0
                    t_head += t2 - t1
                    t_sig += t3 - t2
            calls = len(items) * (m - 1)
            lt.append(1e3 * t_layer / calls)
            ht.append(1e3 * t_head / calls)
            st.append(1e3 * t_sig / calls)
            fr.append(t_sig / t_layer)
            hfr.append((t_head + t_sig) / t_layer)
    return {"layer_ms": _spread(lt), "head_ms": _spread(ht), "signal_ms": _spread(st), "fraction": _spread(fr),
            "head_fraction": _spread(hfr)}


def bench(
    model: MultiExitModel,
    examples,
    signal: str | Signal = "energy",
    thresholds: float | Sequence[float] | None = None,
    target_speedup: float | Sequence[float] | None = None,
    batch_size: int = 32,
    repeats: int = 5,
    warmup: int = 1,
    threads: int | None = None,
    device: str | torch.device = "cpu",
    segment: int | None = None,
    sort_by_length: bool = True,
    overhead_inputs: int = 128,
    precision: str = "fp32",
) -> dict:
    """Wall-clock latency and throughput of early exit against the full model, side by side.

    Thresholds: ``thresholds`` as given, else one per ``target_speedup`` (default 2.0) chosen by
    ``pick_threshold`` on the one-pass logits of ``examples``. Each of ``warmup`` untimed and
    ``repeats`` timed rounds runs every input through: the full model (every layer, final head
    only) and early exit at batch size 1, interleaved input by input; then, segment by segment
    (``segment`` inputs, default 8 x ``batch_size``; the streaming queue drains at the end of
    each), the full model and early exit batched at ``batch_size`` and streaming; with
    ``sort_by_length`` (default) these see the inputs shortest first, the cheapest way to batch
    the full model (input order pads SST-2 batches by about half). Interleaving
    (batches chunk by chunk, rotating order) keeps the side-by-side figures robust to load from
    other processes.
    Wall speed-up = full time / early-exit time per round (batched full model for the batched
    and streaming modes), given as min / median / max over rounds next to the layer speed-up.
    Also the signal overhead at batch size 1 on the first ``overhead_inputs`` inputs.
    ``threads`` fixes ``torch.set_num_threads`` for the call (restored afterwards).
    ``precision`` bf16 runs every model call under bf16 autocast where the device has native
    bf16 (else fp32, with a warning line); the simulation then uses bf16 one-pass logits too.

    Returns a JSON-serialisable dict with keys ``model``, ``signal``, ``num_layers``,
    ``num_inputs``, ``mean_tokens``, ``batch_size``, ``segment``, ``sort_by_length``, ``threads``, ``repeats``,
    ``warmup``, ``device``, ``torch``, ``platform``, ``precision`` (as run), ``attn_implementation``, ``machine``
    (``eebench.accel.machine_info``: CPU model and flags, native bf16, threads), ``full`` ({``single``, ``batched``}),
    ``runs`` (one dict per threshold: ``threshold``, ``target_speedup``, ``layer_speedup``,
    ``exit_counts``, ``matches_simulation`` {mode: {``exit_layers``, ``predictions``} agreement
    fractions}, ``single``, ``batched``, ``streaming``, ``wall_speedup`` {mode: spread},
    ``wall_over_layer`` {mode: median wall speed-up / layer speed-up}, ``cpu_speedup`` {mode:
    spread of the same ratio in process CPU time, a cross-check on a shared machine}) and ``signal_overhead``
    (see ``signal_overhead``). A timing entry has ``total_s`` and ``throughput`` (inputs/s); at
    batch size 1 also ``latency_ms`` {``median``, ``p90``, ``p99``}. Every number that varies
    over rounds is a spread {``min``, ``median``, ``max``}.
    """
    device = torch.device(device)
    sig = get_policy(signal, model=model)
    if repeats < 1:
        raise EebenchError(f"repeats must be at least 1, got {repeats}")
    b = _check_batch(batch_size)
    seg = max(b, (segment or 8 * b) // b * b)  # whole batches, so batched chunks match a full run
    precision, note = resolve_precision(precision, device, "inference")
    if note:
        print(f"warning: {note}", flush=True)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        items = prepare_examples(examples, device)
        n, m = len(items), model.num_layers
        layer_logits, layer_scores = one_pass_scores(model, items, sig, b, device, precision)
        if thresholds is None:
            targets = [2.0] if target_speedup is None else _as_list(target_speedup)
            runs = [{"threshold": pick_threshold(layer_logits, sig, t, scores=layer_scores).threshold,
                     "target_speedup": t} for t in targets]
        else:
            runs = [{"threshold": t, "target_speedup": None} for t in _as_list(thresholds)]
        engines = [EarlyExitEngine(model, sig, r["threshold"], device, precision) for r in runs]
        full = engines[0]

        # Timed tasks: (key, callable on a list of examples).
        single_tasks = [("full-single", lambda x: full.run_full(x, 1))] + [
            (e, lambda x, eng=eng: eng.run(x, "single")) for e, eng in enumerate(engines)]
        chunk_tasks = [("full-batched", lambda x: full.run_full(x, b))] + [
            ((e, "batched"), lambda x, eng=eng: eng.run(x, "batched", b)) for e, eng in enumerate(engines)]
        stream_tasks = [((e, "streaming"), lambda x, eng=eng: eng.run(x, "streaming", b))
                        for e, eng in enumerate(engines)]
        batch_items = sorted(items, key=len) if sort_by_length else items
        clock = time.perf_counter

        cpu_clock = time.process_time

        def one_round(r: int) -> tuple[dict, dict, dict]:
            lat: dict = {k: [] for k, _ in single_tasks}
            tot: dict = {k: 0.0 for k, _ in chunk_tasks + stream_tasks}
            cpu: dict = {k: 0.0 for k, _ in single_tasks + chunk_tasks + stream_tasks}

            def timed(key, fn, arg) -> float:
                c0, t0 = cpu_clock(), clock()
                fn(arg)
                _sync(device)
                wall = clock() - t0
                cpu[key] += cpu_clock() - c0
                return wall

            for j, ex in enumerate(items):
                k = (j + r) % len(single_tasks)
                for key, fn in single_tasks[k:] + single_tasks[:k]:
                    lat[key].append(timed(key, fn, [ex]))
            for s, start in enumerate(range(0, n, seg)):
                part = batch_items[start:start + seg]

                def chunks(part=part, s=s):
                    for c, at in enumerate(range(0, len(part), b)):
                        k = (c + s + r) % len(chunk_tasks)
                        for key, fn in chunk_tasks[k:] + chunk_tasks[:k]:
                            tot[key] += timed(key, fn, part[at:at + b])

                if (s + r) % 2:
                    chunks()
                for key, fn in stream_tasks:
                    tot[key] += timed(key, fn, part)
                if not (s + r) % 2:
                    chunks()
            return lat, tot, cpu

        for r in range(max(0, warmup)):
            one_round(r)
        rounds = [one_round(r) for r in range(repeats)]

        def single_stats(key) -> dict:
            totals = [sum(lat[key]) for lat, _, _ in rounds]
            lats = [sorted(lat[key]) for lat, _, _ in rounds]
            return {
                "total_s": _spread(totals),
                "throughput": _spread([n / t for t in totals]),
                "latency_ms": {q: _spread([1e3 * _quantile(v, p) for v in lats])
                               for q, p in (("median", 0.5), ("p90", 0.9), ("p99", 0.99))},
            }

        def batch_stats(key) -> dict:
            totals = [tot[key] for _, tot, _ in rounds]
            return {"total_s": _spread(totals), "throughput": _spread([n / t for t in totals])}

        sim = exit_layers_from_scores(layer_scores, sig, [r["threshold"] for r in runs])  # [T, N]
        sim_preds = predictions_at_exit(layer_logits, sim)
        for e, (run, eng) in enumerate(zip(runs, engines, strict=True)):
            outs = {mode: eng.run(items, mode, b, sort_by_length=sort_by_length) for mode in MODES}
            layer_speedup = outs["single"].speedup(m)
            run["layer_speedup"] = layer_speedup
            run["exit_counts"] = [int(c) for c in exit_counts(outs["single"].exit_layers, m)]
            run["matches_simulation"] = {
                mode: {"exit_layers": float((o.exit_layers == sim[e]).double().mean()),
                       "predictions": float((o.predictions == sim_preds[e]).double().mean())}
                for mode, o in outs.items()
            }
            run["single"] = single_stats(e)
            run["batched"] = batch_stats((e, "batched"))
            run["streaming"] = batch_stats((e, "streaming"))
            ws = {
                "single": _spread([sum(lat["full-single"]) / sum(lat[e]) for lat, _, _ in rounds]),
                "batched": _spread([tot["full-batched"] / tot[(e, "batched")] for _, tot, _ in rounds]),
                "streaming": _spread([tot["full-batched"] / tot[(e, "streaming")] for _, tot, _ in rounds]),
            }
            # Process CPU time of the same calls: a cross-check that waiting for a busy CPU does
            # not enter (on a shared machine wall time carries other processes' load).
            run["cpu_speedup"] = {
                "single": _spread([cpu["full-single"] / cpu[e] for _, _, cpu in rounds]),
                "batched": _spread([cpu["full-batched"] / cpu[(e, "batched")] for _, _, cpu in rounds]),
                "streaming": _spread([cpu["full-batched"] / cpu[(e, "streaming")] for _, _, cpu in rounds]),
            }
            run["wall_speedup"] = ws
            run["wall_over_layer"] = {k: v["median"] / layer_speedup for k, v in ws.items()}

        lengths = [len(x) for x in items]
        bc = model.config.backbone_config
        return {
            "model": f"random {bc.get('model_type', '?')}" if bc else model.config.model,
            "signal": sig.name,
            "num_layers": m,
            "num_inputs": n,
            "mean_tokens": sum(lengths) / n,
            "batch_size": b,
            "segment": seg,
            "sort_by_length": sort_by_length,
            "threads": torch.get_num_threads(),
            "repeats": repeats,
            "warmup": warmup,
            "device": str(device),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "precision": precision,
            "attn_implementation": model.config.attn_implementation or model.backbone.config._attn_implementation,
            "machine": machine_info(device),
            "full": {"single": single_stats("full-single"), "batched": batch_stats("full-batched")},
            "runs": runs,
            "signal_overhead": signal_overhead(full, items[: max(1, overhead_inputs)], repeats),
        }
    finally:
        torch.set_num_threads(old_threads)


def _as_list(x) -> list[float]:
    return [float(v) for v in (x if isinstance(x, Sequence | torch.Tensor) else [x])]


def format_bench(result: dict) -> str:
    """A markdown report of ``bench``'s result: one table per threshold plus the signal overhead."""

    def med(d: dict) -> float:
        return d["median"]

    def rng(d: dict, fmt: str) -> str:
        return f"{fmt.format(d['median'])} ({fmt.format(d['min'])}-{fmt.format(d['max'])})"

    full = result["full"]
    lines = [
        f"model `{result['model']}`, signal `{result['signal']}`, {result['num_inputs']} inputs "
        f"(mean {result['mean_tokens']:.1f} tokens), batch {result['batch_size']}, "
        f"{'sorted by length' if result['sort_by_length'] else 'input order'}, "
        f"{result['threads']} thread(s), {result['device']}, {result['repeats']} rounds "
        f"(median (min-max)), torch {result['torch']}",
    ]
    if "machine" in result:  # results written before precision / attention were recorded lack these
        mach = result["machine"]
        lines.append(f"precision {result['precision']}, attention {result['attn_implementation']}, CPU "
                     f"{mach['cpu_model']} (flags: {', '.join(mach['cpu_flags']) or 'none of interest'}; "
                     f"native bf16: {'yes' if mach['native_bf16'] else 'no'})")
    for run in result["runs"]:
        ls = run["layer_speedup"]
        lines += [
            "",
            f"threshold {run['threshold']:.6g}: layer speed-up {ls:.3f}x, exit counts {run['exit_counts']}",
            "",
            "| mode | full model | early exit | wall speed-up | wall / layer speed-up | CPU-time speed-up |",
            "|---|---|---|---|---|---|",
        ]
        for mode, base in (("single", full["single"]), ("batched", full["batched"]), ("streaming", full["batched"])):
            ee = run[mode]
            ws = run["wall_speedup"][mode]
            lines.append(
                f"| {mode} ({'batch 1' if mode == 'single' else 'batch ' + str(result['batch_size'])}) | "
                f"{med(base['throughput']):.1f} inputs/s | {med(ee['throughput']):.1f} inputs/s | "
                f"{rng(ws, '{:.2f}')}x | {run['wall_over_layer'][mode]:.2f} | "
                f"{rng(run['cpu_speedup'][mode], '{:.2f}')}x |"
            )
        fl, el = full["single"]["latency_ms"], run["single"]["latency_ms"]
        lines.append(
            f"| latency batch 1 (ms, median / p90 / p99) | {med(fl['median']):.2f} / {med(fl['p90']):.2f} / "
            f"{med(fl['p99']):.2f} | {med(el['median']):.2f} / {med(el['p90']):.2f} / {med(el['p99']):.2f} | | | |"
        )
        agree = ", ".join(f"{k} {v['exit_layers']:.3f}/{v['predictions']:.3f}" for k, v in run["matches_simulation"].items())
        lines += ["", f"agreement with the one-pass simulation (exit layers / predictions): {agree}"]
    ov = result["signal_overhead"]
    if ov["fraction"] is not None:
        lines += [
            "",
            f"signal overhead at batch 1 (signal + exit decision per layer): "
            f"{100 * ov['fraction']['median']:.2f}% of a layer "
            f"({ov['signal_ms']['median'] * 1e3:.0f} us vs {ov['layer_ms']['median']:.3f} ms; "
            f"range {100 * ov['fraction']['min']:.2f}-{100 * ov['fraction']['max']:.2f}%); "
            f"with the exit head (pooling + classifier, {ov['head_ms']['median'] * 1e3:.0f} us): "
            f"{100 * ov['head_fraction']['median']:.2f}%",
        ]
    return "\n".join(lines)
