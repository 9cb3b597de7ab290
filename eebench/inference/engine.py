"""True early-exit inference.

``EarlyExitEngine`` runs a trained ``MultiExitModel`` layer by layer with one exit signal and one
threshold, in three modes that all give the exit layers and predictions of the one-pass simulation
(``eebench.exits.rule.simulate_exits``) up to float noise:

* ``single``: one input at a time, no padding (the latency setting);
* ``batched``: fixed batches (in input order, or shortest first with ``sort_by_length``); exited
  samples leave the batch after every layer and padding columns only they needed are trimmed;
* ``streaming``: the batch is kept full by refilling it with waiting inputs as others exit; every
  sample keeps its own layer position, hidden states and length. A batch whose lengths spread
  widely runs as length groups (``split_gain``, ``length_groups``): less padding for one more call.

Every mode drives the model's one ``LayerStepper`` (embed -> layer -> exit head) and asks an exit
policy (``eebench.exits.policies``: a signal + threshold, or a method's own rule such as BERxiT's LTE or
PALBERT's Q-exit) after every layer through its incremental form; the maths lives in
``eebench.exits.signals`` / ``eebench.exits.policies`` and ``eebench.exits.rule``. Threshold
choice is ``eebench.inference.thresholds``, the wall-clock measurement ``eebench.inference.bench``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from eebench.errors import EebenchError
from eebench.exits.metrics import speedup_ratio
from eebench.exits.policies import ExitPolicy, SignalPolicy, get_policy
from eebench.exits.signals import EXIT_COMPARE, Signal
from eebench.model.accel import autocast, resolve_precision
from eebench.model.backbone import MultiExitModel, select_state

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
    hstate: tuple | None = None  # the exit combiner's state (GPFEE's past), the same way


#: Streaming's default padding-aware split (``length_groups``): a layer's cost grows with the
#: padded tokens it runs; splitting a batch whose lengths spread widely saves more than the extra
#: call costs once it removes 5% of them (measured on MiniLM-L6, SST-2 dev, one CPU thread).
SPLIT_GAIN = 0.05


def length_groups(lengths: Sequence[int], gain: float | None, min_size: int = 1) -> list[list[int]]:
    """Positions of a batch (shortest first) in groups that each run as one padded batch.

    The batch is split at the point that minimises the padded tokens (size x longest) of its two
    parts when that removes more than ``gain`` of them, each part keeping at least ``min_size``
    rows; the parts are split again the same way. ``gain`` None: one group.
    """
    order = sorted(range(len(lengths)), key=lambda k: lengths[k])
    if not gain:
        return [order]
    out: list[list[int]] = []
    todo = [order]
    while todo:
        part = todo.pop()
        n = len(part)
        longest = lengths[part[-1]]
        best, cut = n * longest, None
        for k in range(max(1, min_size), n - max(1, min_size) + 1):
            cost = k * lengths[part[k - 1]] + (n - k) * longest
            if cost < best:
                best, cut = cost, k
        if cut is not None and best < (1.0 - gain) * n * longest:
            todo += [part[cut:], part[:cut]]  # the shorter part runs first
        else:
            out.append(part)
    return out


class EarlyExitEngine:
    """Early-exit inference with one exit policy and threshold on a ``MultiExitModel``.

    ``signal``: a signal name / object or an ``ExitPolicy`` (a method's policy by name, e.g.
    ``lte``, when the model carries that method's modules). ``run`` returns, in input order, the
    exit layer, prediction and exit logits of every input; all modes reproduce ``simulate_exits``
    on the model's one-pass output. The model is put in eval mode (and on ``device``); everything
    runs under ``torch.inference_mode``.
    """

    def __init__(self, model: MultiExitModel, signal: str | Signal | ExitPolicy, threshold: float,
                 device: str | torch.device = "cpu", precision: str = "fp32", split_gain: float | None = SPLIT_GAIN):
        self.device = torch.device(device)
        #: Streaming: a batch is run as two length groups when that removes more than this share of
        #: its padded tokens (``length_groups``); None or 0: never (every step one full batch).
        if split_gain is not None and not 0 <= split_gain < 1:
            raise EebenchError(f"split_gain {split_gain} is not allowed; give a share in [0, 1) (0 or None: never split)")
        self.split_gain = split_gain or None
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
        # Compared in float64, exactly as eebench.exits.rule.exit_layers_from_scores does.
        self._thr = torch.tensor(self.threshold, dtype=torch.float64, device=self.device)
        stepper = model.stepper
        self._embed, self._layer, self._restate = stepper.embed, stepper.layer, stepper.restate
        # Precomputed per-exit head functions: no module dispatch or dropout check per layer.
        self._head_fns = stepper.eval_heads()
        #: A method module that computes the exits' logits from layers <= i (``ExitCombiner``,
        #: GPFEE), or None; its state travels with the rows like the policy's.
        self._combiner = model.exit_combiner
        self._step = self.policy.step
        self._meets = self.policy.meets
        # Batch size 1 compares one Python float (float64, as the tensor comparison) unless the
        # policy brings its own ``meets``.
        default_meets = type(self.policy).meets is ExitPolicy.meets or (
            isinstance(self.policy, SignalPolicy) and type(self.policy.signal).meets is Signal.meets)
        self._py_meets = EXIT_COMPARE[(bool(self.policy.higher_is_easier), bool(self.policy.strict))] if default_meets else None
        # Batch size 1 also skips the signal's kernels when its float64 scalar form is clearly on
        # one side of the threshold (``Signal.scalar``): the decision is then the kernels' own.
        self._scalar = None
        if self._py_meets is not None and isinstance(self.policy, SignalPolicy) \
                and not self.policy.signal.needs_history and type(self.policy.signal).scalar is not Signal.scalar:
            self._scalar = self.policy.signal.scalar
        #: Batch-size-1 decisions taken from the scalar form / from the signal's kernels (counts).
        self.scalar_decisions = [0, 0]

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
                hmask = mask.to(hidden.dtype) if b > 1 else None
                comb, hs = self._combiner, None
                if comb is not None:
                    hs = comb.begin()
                for i in range(m):
                    if on_layer is not None:
                        on_layer(i + 1, list(range(start, start + len(group))))
                    hidden = layer(i, hidden, state)
                    if comb is not None:  # its final logits read every layer's pooled vector
                        logits, hs = comb.step(i, self._head_fns[i](hidden, hmask)[0], hs)
                logits_out.append(final(hidden, hmask)[1] if comb is None else logits)
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
        """Batch size 1: the decision as a Python bool, exactly the tensor comparison's.

        With a signal's scalar form (``Signal.scalar``) the logits are read once and the decision
        is taken in float64 Python when the value is farther from the threshold than its bound
        (then the float32 kernels' value is on the same side); otherwise, and for policies
        without one, the policy's value is computed and read once, compared as a Python float
        (float64, as the tensor comparison) unless the policy brings its own ``meets``.
        """
        if self._scalar is not None:
            value = self._scalar(logits.tolist()[0])
            if value is not None and abs(value[0] - self.threshold) > value[1]:
                self.scalar_decisions[0] += 1
                return self._py_meets(value[0], self.threshold), pstate
            self.scalar_decisions[1] += 1
        scores, pstate = self._step(layer, logits, features, pstate)
        if self._py_meets is not None:
            return self._py_meets(float(scores), self.threshold), pstate
        return bool(self._meets(scores.double(), self._thr)), pstate

    def _single(self, items: list[Example], on_layer) -> EngineOutput:
        m = self.num_layers
        embed, layer, heads, leave_one = self._embed, self._layer, self._head_fns, self._leave_one
        begin = self.policy.begin
        comb, hs = self._combiner, None
        layers, logits_out = [], []
        for j, ex in enumerate(items):
            ids, mask, tt = _unbatched(ex)
            hidden, state = embed(ids, mask, tt)
            pstate = begin()
            if comb is not None:
                hs = comb.begin()
            for i in range(m):
                if on_layer is not None:
                    on_layer(i + 1, [j])
                hidden = layer(i, hidden, state)
                feats, logits = heads[i](hidden, None)  # one unpadded input: pool over every token
                if comb is not None:
                    logits, hs = comb.step(i, feats, hs)
                if i == m - 1:
                    break
                leave, pstate = leave_one(i, logits, feats, pstate)
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
            comb = self._combiner
            hs = None if comb is None else comb.begin()
            for i in range(m):
                if on_layer is not None:
                    on_layer(i + 1, alive.tolist())
                hidden = layer(i, hidden, state)
                feats, logits = heads[i](hidden, hmask)
                if comb is not None:
                    logits, hs = comb.step(i, feats, hs)
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
                if hs is not None:
                    hs = tuple(t[stay_d] for t in hs)
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
        queue stays below 2 * ``b`` samples. With ``split_gain``, a step's batch whose lengths
        spread widely runs as length groups (``length_groups``, each at least a quarter batch).
        """
        n, m = len(items), self.num_layers
        embed, run_layer, heads = self._embed, self._layer, self._head_fns
        comb, gain, min_size = self._combiner, self.split_gain, max(1, b // 4)
        queues: list[deque[_Slot]] = [deque() for _ in range(m)]
        exit_layer = [m] * n
        exit_logits: list[torch.Tensor | None] = [None] * n
        lengths = [len(e) for e in items]

        def advance(layer, index, hidden, mask, state, pstate, hs):
            if on_layer is not None:
                on_layer(layer + 1, index)
            hidden = run_layer(layer, hidden, state)
            feats, logits = heads[layer](hidden, mask.to(hidden.dtype))
            if comb is not None:
                logits, hs = comb.step(layer, feats, hs)
            if layer == m - 1:
                for j, k in enumerate(index):
                    exit_logits[k] = logits[j]
                return
            leave, pstate = self._leave(layer, logits, feats, pstate)
            nxt = queues[layer + 1]
            for j, (k, gone) in enumerate(zip(index, leave.tolist(), strict=True)):
                if gone:
                    exit_layer[k] = layer + 1
                    exit_logits[k] = logits[j]
                else:
                    length = lengths[k]
                    nxt.append(_Slot(k, hidden[j, :length], mask[j, :length],
                                     None if pstate is None else tuple(t[j] for t in pstate),
                                     None if hs is None else tuple(t[j] for t in hs)))

        next_input = 0
        while True:
            layer = next((k for k in range(m - 1, 0, -1) if len(queues[k]) >= b), None)
            if layer is None and next_input < n:
                first, next_input = next_input, min(n, next_input + b)
                for group in length_groups(lengths[first:next_input], gain, min_size):
                    index = [first + k for k in sorted(group)]
                    ids, mask, tt = collate([items[k] for k in index])
                    hidden, state = embed(ids, mask, tt)
                    advance(0, index, hidden, mask, state, self.policy.begin(),
                            None if comb is None else comb.begin())
                continue
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
            for group in length_groups([s.hidden.shape[0] for s in slots], gain, min_size):
                part = [slots[k] for k in sorted(group)]
                hidden = pad_sequence([s.hidden for s in part], batch_first=True)
                mask = pad_sequence([s.mask for s in part], batch_first=True)
                pstate = None if part[0].pstate is None else tuple(
                    torch.stack(parts) for parts in zip(*(s.pstate for s in part), strict=True))
                hs = None if part[0].hstate is None else tuple(
                    torch.stack(parts) for parts in zip(*(s.hstate for s in part), strict=True))
                advance(layer, [s.index for s in part], hidden, mask, self._restate(hidden, mask), pstate, hs)
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


