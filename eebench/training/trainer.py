"""The trainer shared by every strategy: AdamW, linear decay, clipping, accumulation, resumable.

Reference defaults (COSEE's official code): AdamW lr 2e-5, eps 1e-8, no weight decay, linear
decay without warm-up, gradient clipping at 1.0. ``batch_size`` is the effective batch;
``micro_batch_size`` splits it for gradient accumulation so the reference batch of 128 fits
anywhere. Checkpoints (model, optimiser, scheduler, RNG and strategy state) are safetensors +
JSON: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from eebench.data.metrics import compute_metrics, majority_score
from eebench.errors import EebenchError
from eebench.model.accel import autocast, resolve_precision
from eebench.model.backbone import MultiExitModel
from eebench.strategy import Phase, StepContext, Strategy, set_trainable, trainable_mask
from eebench.util import atomic_write as _atomic
from eebench.util import pick_device

log = logging.getLogger("eebench")


@dataclass
class TrainConfig:
    lr: float = 2e-5
    head_lr: float | None = None  # None: same as lr
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    epochs: int = 1
    batch_size: int = 32
    micro_batch_size: int | None = None  # None: no accumulation
    max_grad_norm: float = 1.0
    seed: int = 42
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 (autocast: CUDA, or a CPU with native bf16) | fp16 (CUDA)
    checkpoint_every: int = 50  # optimiser steps; 0: only at epoch ends
    group_by_length: bool = False
    eval_batch_size: int = 64
    progress: bool = True

    def accumulation(self) -> int:
        mb = self.micro_batch_size or self.batch_size
        if self.batch_size % mb:
            raise EebenchError(f"batch size {self.batch_size} is not a multiple of micro-batch size {mb}")
        return self.batch_size // mb


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # one entry per epoch: per-layer dev metrics
    steps: int = 0
    train_seconds: float = 0.0  # this process's training time
    resumed_from_step: int = 0
    # Training time of the earlier processes, up to the checkpoint this one resumed from (the work
    # after it was lost and redone): 0.0 for a run from the start, None when the checkpoint predates
    # this record (written by eebench before it kept one).
    seconds_before_resume: float | None = 0.0

    @property
    def total_seconds(self) -> float | None:
        """Training time of the steps that made the model, over all its processes; None if unknown."""
        return None if self.seconds_before_resume is None else self.seconds_before_resume + self.train_seconds


def _so_far(result: TrainResult, t0: float) -> float | None:
    """Training seconds up to now over all processes (what a checkpoint records); None if unknown."""
    before = result.seconds_before_resume
    return None if before is None else before + (time.perf_counter() - t0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@torch.no_grad()
def collect_logits(model: MultiExitModel, tokenized, tokenizer, batch_size: int = 64, device=None):
    """Logits of every exit for a whole split in one pass each batch: ([N, M, C] float32, labels [N]),
    in the dataset's row order."""
    logits, labels, _ = collect_outputs(model, tokenized, tokenizer, batch_size, device)
    return logits, labels


@torch.no_grad()
def collect_outputs(model: MultiExitModel, tokenized, tokenizer, batch_size: int = 64, device=None,
                    policies=()) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``collect_logits`` plus, from the same pass, the values [N, M] of every policy in
    ``policies`` (bound exit policies that read the model's own modules), by name."""
    from eebench.data import make_loader

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    n = len(tokenized)
    out = None
    labels = None
    scores: dict[str, torch.Tensor] = {}
    for batch in make_loader(tokenized, tokenizer, batch_size, shuffle=False, group_by_length=True):
        idx = batch["index"]
        res = model(**_model_inputs(batch, device))
        logits = res.logits.float().cpu()
        if out is None:
            out = torch.zeros(n, *logits.shape[1:])
            labels = torch.zeros(n, dtype=batch["labels"].dtype)
            scores = {p.name: torch.zeros(n, logits.shape[1], dtype=torch.float64) for p in policies}
        out[idx] = logits
        labels[idx] = batch["labels"]
        for p in policies:
            scores[p.name][idx] = p.scores(res).double().cpu()
    model.train(was_training)
    return out, labels, scores


def _model_inputs(batch: dict, device) -> dict:
    keys = ("input_ids", "attention_mask", "token_type_ids")
    return {k: batch[k].to(device) for k in keys if k in batch}


def layer_metrics(layer_logits: torch.Tensor, labels: torch.Tensor, metric_names: list[str]) -> list[dict]:
    """Task metrics of every exit classifier: one dict per layer."""
    preds = layer_logits.argmax(-1)
    return [compute_metrics(metric_names, preds[:, m].numpy(), labels.numpy()) for m in range(preds.shape[1])]


def collapsed_layers(layer_logits: torch.Tensor, labels: torch.Tensor, metric: str, tol: float = 0.01) -> list[int]:
    """1-based internal layers whose dev score is no better (within ``tol``) than always
    predicting the majority class: their exits can only hurt."""
    base = majority_score(metric, labels.numpy())
    scores = layer_metrics(layer_logits, labels, [metric])
    return [m + 1 for m, s in enumerate(scores[:-1]) if s[metric] <= base + tol]


class Trainer:
    """Trains a MultiExitModel with a strategy; resumable from its checkpoint folder."""

    def __init__(self, model: MultiExitModel, strategy: Strategy, cfg: TrainConfig, tokenizer, spec,
                 out_dir: str | Path | None = None, on_epoch: Callable[[int, dict], None] | None = None):
        self.model, self.strategy, self.cfg = model, strategy, cfg
        model.attach(strategy)  # the method's own modules (no-op when the caller attached them)
        self.tokenizer, self.spec = tokenizer, spec
        self.out_dir = Path(out_dir) if out_dir else None
        self.on_epoch = on_epoch
        self.last_dev: tuple[torch.Tensor, torch.Tensor, float, dict] | None = None
        self.device = pick_device(cfg.device)
        #: The precision that runs (bf16 asked on a CPU without native bf16 runs fp32; see accel).
        self.precision, note = resolve_precision(cfg.precision, self.device, "training")
        if note:
            print(f"warning: {note}", flush=True)

    # -- optimiser ------------------------------------------------------------------------
    def _optimizer(self, phase: Phase | None = None):
        """Parameter groups in a fixed order: the body at ``lr``, the exit heads at ``head_lr``,
        then every method group (``Strategy.param_groups``) at its own rate."""
        head, body = [], []
        extra = self.strategy.param_groups()
        own: dict[str, list] = {g: [] for g in extra}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            g = next((g for g, spec in extra.items() if any(name.startswith(x) for x in spec["prefixes"])), None)
            if g is not None:
                own[g].append(p)
            else:
                (head if name.startswith("heads.") else body).append(p)
        groups = [g for g in (
            {"params": body, "lr": self.cfg.lr},
            {"params": head, "lr": self.cfg.head_lr or self.cfg.lr},
            *({"params": own[g], "lr": extra[g].get("lr") or self.cfg.lr} for g in extra),
        ) if g["params"]]
        phase = phase or Phase("joint")
        if phase.lr is not None:  # one rate for the whole phase
            for g in groups:
                g["lr"] = phase.lr
        if phase.optimizer == "adamw":
            return torch.optim.AdamW(groups, eps=self.cfg.adam_eps, weight_decay=self.cfg.weight_decay)
        if phase.optimizer == "adam":
            return torch.optim.Adam(groups, eps=self.cfg.adam_eps, weight_decay=self.cfg.weight_decay)
        raise EebenchError(f"phase {phase.name!r}: unknown optimizer {phase.optimizer!r}; known: adamw, adam")

    def _autocast(self):
        # Weights and optimiser state stay fp32 (master weights); the loss is computed in fp32
        # from the upcast logits. Evaluation runs in fp32, so dev logits, sweeps and the true
        # early-exit check see the same numbers as an fp32-trained model would.
        return autocast(self.device, self.precision)

    # -- main loop --------------------------------------------------------------------------
    def train(self, train_ds, dev_ds, resume: bool = False) -> TrainResult:
        from eebench.data import make_loader

        cfg, model = self.cfg, self.model
        accum = cfg.accumulation()
        mb = cfg.micro_batch_size or cfg.batch_size
        seed_everything(cfg.seed)
        model.to(self.device)
        phases = self.strategy.phases()
        train_ds = self._hold_out(train_ds, mb)
        micro_per_epoch = math.ceil(len(train_ds) / mb)
        steps_per_epoch = math.ceil(micro_per_epoch / accum)
        phase_epochs = [cfg.epochs * p.epochs_factor for p in phases]
        total_steps = steps_per_epoch * sum(phase_epochs)
        result = TrainResult()
        state = {"phase": 0, "epoch": 0, "micro": 0, "step": 0}
        ckpt = self.out_dir / "checkpoint" if self.out_dir else None
        doc = self._resume_point(ckpt) if resume and ckpt is not None and ckpt.is_dir() else None
        if doc is not None:
            state, result.history = doc["state"], doc["history"]
            result.resumed_from_step = state["step"]
            result.seconds_before_resume = state.get("train_seconds")
        scaler = torch.amp.GradScaler("cuda") if (self.device.type == "cuda" and self.precision == "fp16") else None
        t0 = time.perf_counter()
        extra_groups = self.strategy.param_groups()
        for pi in range(state["phase"], len(phases)):
            set_trainable(model, phases[pi].trainable, extra_groups)
            phase_mask = {n: p.requires_grad for n, p in model.named_parameters()}
            opt = self._optimizer(phases[pi])
            phase_steps = steps_per_epoch * phase_epochs[pi]
            if phases[pi].schedule == "linear":
                sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s, T=phase_steps: max(0.0, 1 - s / max(T, 1)))
            elif phases[pi].schedule == "constant":
                sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
            else:
                raise EebenchError(f"phase {phases[pi].name!r}: unknown schedule {phases[pi].schedule!r}; "
                                   "known: linear, constant")
            step_mask = None  # the per-step freeze in force (None: the phase's)
            if doc is not None and pi == state["phase"]:
                self._load_checkpoint(ckpt, opt, sched)
                doc = None  # only the phase the run stopped in resumes; later phases start afresh
            first_epoch = state["epoch"] if pi == state["phase"] else 0
            if first_epoch == 0 and not (pi == state["phase"] and state["micro"]):
                self.strategy.on_phase_start(pi, phases[pi], self, train_ds)
            for epoch in range(first_epoch, phase_epochs[pi]):
                skip = state["micro"] if (pi == state["phase"] and epoch == state["epoch"]) else 0
                model.train()
                loader = make_loader(train_ds, self.tokenizer, mb, shuffle=True,
                                     seed=cfg.seed * 1000 + pi * 100 + epoch, group_by_length=cfg.group_by_length)
                bar = tqdm(total=micro_per_epoch, initial=skip, disable=None if cfg.progress else True, leave=False,
                           desc=f"{self.strategy.name} {phases[pi].name} epoch {epoch + 1}/{phase_epochs[pi]}")
                opt.zero_grad(set_to_none=True)
                for micro, batch in enumerate(loader):
                    if micro < skip:
                        continue
                    share = (len(batch["labels"]) / mb) / accum
                    ctx = StepContext(step=state["step"], total_steps=total_steps, epoch=epoch, phase=pi, micro=micro,
                                      rows=batch.get("index"), loss_scale=share,
                                      inputs=_model_inputs(batch, self.device), lr=sched.get_last_lr()[0])
                    now = self.strategy.trainable_now(ctx)
                    if now is not None or step_mask is not None:
                        step_mask = self._step_freeze(now, phase_mask, extra_groups)
                    inputs, labels = ctx.inputs, batch["labels"].to(self.device)
                    k = int(self.strategy.batch_copies(ctx))
                    if k > 1:  # copies of each row, adjacent; they differ only by dropout noise
                        inputs = {n: v.repeat_interleave(k, 0) for n, v in inputs.items()}
                        labels = labels.repeat_interleave(k, 0)
                        ctx.copies = k
                        ctx.rows = None if ctx.rows is None else ctx.rows.repeat_interleave(k, 0)
                        ctx.inputs = inputs
                    with self._autocast():
                        out = model(**inputs, hidden_states=self.strategy.needs_hidden_states)
                    loss, logs = self.strategy.compute_loss(out, labels, ctx)
                    loss = loss * (len(batch["labels"]) / mb) / accum
                    (scaler.scale(loss) if scaler else loss).backward()
                    bar.update(1)
                    last = micro + 1 == micro_per_epoch
                    if (micro + 1) % accum == 0 or last:
                        if scaler:
                            scaler.unscale_(opt)
                        self.strategy.on_gradients(ctx)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                        (scaler.step(opt), scaler.update()) if scaler else opt.step()
                        sched.step()
                        opt.zero_grad(set_to_none=True)
                        state["step"] += 1
                        shown = float(loss.detach()) * accum
                        bar.set_postfix(loss=f"{shown:.4f}")
                        if bar.disable and cfg.progress and state["step"] % 25 == 0:  # logs without a terminal
                            print(f"{self.strategy.name}: step {state['step']}/{total_steps} loss {shown:.4f} "
                                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
                        state["micro"] = micro + 1
                        if ckpt is not None and cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0 and not last:
                            state.update(phase=pi, epoch=epoch, train_seconds=_so_far(result, t0))
                            self._save_checkpoint(ckpt, opt, sched, state, result.history)
                bar.close()
                self.strategy.on_epoch_end(epoch)
                metrics = self.evaluate(dev_ds)
                entry = {"phase": phases[pi].name, "epoch": epoch + 1, "step": state["step"], "layers": metrics}
                result.history.append(entry)
                if self.on_epoch:
                    self.on_epoch(len(result.history), entry)
                state.update(phase=pi, epoch=epoch + 1, micro=0, train_seconds=_so_far(result, t0))
                if ckpt is not None:
                    self._save_checkpoint(ckpt, opt, sched, state, result.history)
            state.update(phase=pi + 1, epoch=0, micro=0)
        result.steps = state["step"]
        result.train_seconds = time.perf_counter() - t0
        model.eval()
        return result

    def _hold_out(self, train_ds, batch_size: int):
        """The rows the main loop trains on: all of ``train_ds``, or, when the method asks for a
        held-out share (``Strategy.held_out``), the rest after that share is set aside (a seeded
        permutation of the training rows only: dev rows can never be in it)."""
        want = self.strategy.held_out()
        if not want:
            return train_ds
        fraction, seed = want
        n = len(train_ds)
        k = round(float(fraction) * n)
        if not 0 < k < n:
            raise EebenchError(f"held-out fraction {fraction} of {n} training rows leaves "
                               f"{k} held out and {n - k} to train on; both must be at least 1 (0 < fraction < 1)")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
        held, kept = sorted(perm[:k]), sorted(perm[k:])
        self.strategy.held_out_data = HeldOutStream(train_ds.select(held), self.tokenizer, batch_size, int(seed),
                                                    self.device)
        return train_ds.select(kept)

    def _step_freeze(self, now, phase_mask: dict[str, bool], extra_groups) -> dict | None:
        """Apply a per-step freeze (``Strategy.trainable_now``): parameters learn when both the
        phase and the step say so; None restores the phase's mask."""
        mask = phase_mask if now is None else {
            n: on and phase_mask[n] for n, on in trainable_mask(self.model, now, extra_groups).items()}
        for n, p in self.model.named_parameters():
            if p.requires_grad != mask[n]:
                p.requires_grad_(mask[n])
        return None if now is None else mask

    def collect(self, ds) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [N, M, C] of every exit and labels [N] of ``ds`` in eval mode (rows in the
        dataset's order; the model's train / eval mode is restored)."""
        return collect_logits(self.model, ds, self.tokenizer, self.cfg.eval_batch_size, self.device)

    def evaluate(self, dev_ds) -> list[dict]:
        """Per-layer dev metrics; the logits, the method policies' values and the time of that
        forward pass are kept in ``last_dev`` = (logits, labels, seconds, scores) so that the
        caller need not run it again."""
        t0 = time.perf_counter()
        # The method's own policies, bound to the model: what ``get_policy(name, model=...)`` gives
        # for them, built here so that training needs nothing from the exits layer above it.
        pols = [cls().bind(self.model) for cls in self.strategy.policies().values()]
        logits, labels, scores = collect_outputs(self.model, dev_ds, self.tokenizer, self.cfg.eval_batch_size,
                                                 self.device, pols)
        self.last_dev = (logits, labels, time.perf_counter() - t0, scores)
        return layer_metrics(logits, labels, self.spec.metrics)

    # -- checkpoints ------------------------------------------------------------------------
    # A checkpoint is a set of files (weights, optimiser + RNG tensors, trainer state) that must
    # come from one step. Each save writes a new generation folder ``gen-<step>-<id>/`` and then
    # switches the pointer ``current.json`` (which also holds the generation's manifest: step, and
    # size + SHA-256 of every file) with one atomic rename. A kill at any moment leaves either the
    # old or the new generation current, never a mix; anything else in the folder is debris of a
    # kill and is removed. Only one process writes a cell's checkpoint (the runner's cell lock).
    def _save_checkpoint(self, d: Path, opt, sched, state: dict, history: list) -> None:
        from safetensors.torch import save_file

        d.mkdir(parents=True, exist_ok=True)
        current = _read_pointer(d)
        _remove_debris(d, keep=current)
        gen = d / f"gen-{state['step']:08d}-{uuid.uuid4().hex[:8]}"
        gen.mkdir()
        self.model.save(gen)
        tensors, meta = _flatten_optimizer(opt)
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        np_state = np.random.get_state()
        tensors["rng.numpy.keys"] = torch.from_numpy(np_state[1].astype(np.int64))
        _atomic(gen / "optimizer.safetensors", lambda p: save_file(tensors, p))
        doc = {
            "state": state,
            "history": history,
            "optimizer": meta,
            "scheduler": sched.state_dict() | {"lr_lambdas": None},
            "strategy": self.strategy.state_dict(),
            "rng": {"python": _py_rng_to_json(random.getstate()), "numpy_pos": int(np_state[2]),
                    "numpy_gauss": [int(np_state[3]), float(np_state[4])]},
            "train_config": asdict(self.cfg),
        }
        _atomic(gen / "trainer_state.json", lambda p: Path(p).write_text(json.dumps(doc)))
        manifest = {"format": CHECKPOINT_FORMAT, "generation": gen.name, "step": state["step"],
                    "files": {f.name: {"size": f.stat().st_size, "sha256": _sha256(f)}
                              for f in sorted(gen.iterdir()) if f.is_file()}}
        # The switch: from here on the new generation is the checkpoint.
        _atomic(d / POINTER, lambda p: Path(p).write_text(json.dumps(manifest, indent=1)))
        _remove_debris(d, keep=gen.name)

    def _resume_point(self, d: Path) -> dict | None:
        """The trainer state of the checkpoint in ``d`` if it is complete and self-consistent;
        else None, after saying on the console which file is wrong (the cell then trains from
        the start: a torn checkpoint must never be resumed)."""
        problem = checkpoint_problem(d)
        if problem is None:
            doc = json.loads((d / _read_pointer(d) / "trainer_state.json").read_text())
            _remove_debris(d, keep=_read_pointer(d))
            return doc
        if any(d.iterdir()):
            print(f"warning: {problem}; training this cell from the start", flush=True)
        _remove_debris(d, keep=None)
        return None

    def _load_checkpoint(self, d: Path, opt, sched) -> None:
        from safetensors.torch import load_file

        gen = d / _read_pointer(d)
        try:
            doc = json.loads((gen / "trainer_state.json").read_text())
            loaded = MultiExitModel.load(gen)
            self.model.load_state_dict(loaded.state_dict())
            tensors = load_file(gen / "optimizer.safetensors")
            _restore_optimizer(opt, tensors, doc["optimizer"], self.device)
            sd = dict(doc["scheduler"])
            sd.pop("lr_lambdas", None)
            sched.load_state_dict(sd | {"lr_lambdas": [None] * len(opt.param_groups)})
            self.strategy.load_state_dict(doc["strategy"])
            torch.set_rng_state(tensors["rng.torch"])
            for i in range(torch.cuda.device_count()):
                if f"rng.cuda.{i}" in tensors:
                    torch.cuda.set_rng_state(tensors[f"rng.cuda.{i}"], i)
            random.setstate(_py_rng_from_json(doc["rng"]["python"]))
            g = doc["rng"]["numpy_gauss"]
            np.random.set_state(("MT19937", tensors["rng.numpy.keys"].numpy().astype(np.uint32), doc["rng"]["numpy_pos"],
                                 g[0], g[1]))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, EebenchError) as e:
            # The files passed their manifest but do not fit this run (e.g. written by another
            # eebench version): the model may be half loaded, so stop rather than guess.
            raise EebenchError(f"checkpoint {gen} cannot be resumed ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                               f"delete {d} to train this cell from the start") from None
        log.info("resumed from %s at optimiser step %d", gen, doc["state"]["step"])


class HeldOutStream:
    """Batches of a method's held-out rows, an endless deterministic stream: batch ``k`` is the
    ``k mod B``-th batch of pass ``k // B`` over the rows, each pass shuffled with a seed derived
    from ``seed`` and the pass. The method keeps ``k`` (in its state, for bit-exact resume); the
    stream keeps nothing but a cache of the current pass."""

    def __init__(self, rows, tokenizer, batch_size: int, seed: int, device):
        self.rows, self.tokenizer, self.batch_size, self.seed, self.device = rows, tokenizer, batch_size, seed, device
        self.batches_per_pass = math.ceil(len(rows) / batch_size)
        self._pass: tuple[int, list] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, k: int) -> tuple[dict, torch.Tensor]:
        """(model inputs on the device, labels on the device) of batch ``k`` (0-based)."""
        from eebench.data import make_loader

        p, i = divmod(int(k), self.batches_per_pass)
        if self._pass is None or self._pass[0] != p:
            loader = make_loader(self.rows, self.tokenizer, self.batch_size, shuffle=True,
                                 seed=self.seed * 1000 + 7919 + p)
            self._pass = (p, list(loader))
        b = self._pass[1][i]
        return _model_inputs(b, self.device), b["labels"].to(self.device)


CHECKPOINT_FORMAT = 2
POINTER = "current.json"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _read_pointer(d: Path) -> str | None:
    """The name of the current generation (None: no readable pointer)."""
    try:
        name = json.loads((d / POINTER).read_text())["generation"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) and "/" not in name and name not in (".", "..") else None


def has_checkpoint(d: Path) -> bool:
    """Whether ``d`` holds anything that looks like a checkpoint (valid or not)."""
    return d.is_dir() and any(d.iterdir())


def checkpoint_problem(d: Path) -> str | None:
    """None if the checkpoint in ``d`` is complete and self-consistent (the pointer's manifest
    matches every file of its generation, and the trainer state is from the manifest's step);
    else one line naming the file that is wrong."""
    ptr = d / POINTER
    if not ptr.exists():
        if (d / "trainer_state.json").exists():
            return f"checkpoint {d} has the old layout without a manifest and cannot be verified"
        return f"checkpoint {d} has no {POINTER} (a kill before its first complete save)"
    try:
        manifest = json.loads(ptr.read_text())
        gen = d / manifest["generation"]
        files = manifest["files"]
        step = int(manifest["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"checkpoint pointer {ptr} is unreadable"
    if _read_pointer(d) is None or not gen.is_dir():
        return f"checkpoint pointer {ptr} names a missing generation {manifest.get('generation')!r}"
    for name in ("model.safetensors", "optimizer.safetensors", "trainer_state.json"):
        if name not in files:
            return f"checkpoint manifest {ptr} lacks {name}"
    for name, want in files.items():
        f = gen / name
        if not f.is_file():
            return f"checkpoint file {f} is missing"
        if f.stat().st_size != want["size"]:
            return f"checkpoint file {f} is {f.stat().st_size} bytes, its manifest says {want['size']} (truncated)"
        if _sha256(f) != want["sha256"]:
            return f"checkpoint file {f} does not match the SHA-256 in its manifest (corrupt)"
    try:
        doc_step = json.loads((gen / "trainer_state.json").read_text())["state"]["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"checkpoint file {gen / 'trainer_state.json'} is unreadable"
    if doc_step != step:
        return f"checkpoint file {gen / 'trainer_state.json'} is from step {doc_step}, its manifest says {step}"
    return None


def _remove_debris(d: Path, keep: str | None) -> None:
    """Remove everything in the checkpoint folder but the pointer and generation ``keep``:
    older generations, half-written ones and temporary files left by a kill."""
    if not d.is_dir():
        return
    for p in d.iterdir():
        if p.name == keep or (keep is not None and p.name == POINTER):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _flatten_optimizer(opt) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(opt, tensors: dict, meta: dict, device) -> None:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v.to(device) if name != "step" else v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _py_rng_to_json(st):
    return [st[0], list(st[1]), st[2]]


def _py_rng_from_json(st):
    return (st[0], tuple(st[1]), st[2])
