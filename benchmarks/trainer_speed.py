"""Training throughput of eebench's real Trainer against a bare transformers loop (issue 18).

Every contender trains one epoch over the same rows, in the same batches (eebench's loader,
plain shuffled batches padded to their longest row, ``group_by_length=False``, the same seed):

* ``trainer``: ``eebench.training.trainer.Trainer`` with the ``vanilla`` strategy, exactly as
  ``eebench run`` drives it (the dev set is 8 rows so that the epoch-end evaluation is noise);
* ``bare``: a plain loop a transformers user would write: ``AutoModel`` with
  ``output_hidden_states=True``, one mean-pooled linear exit per layer, summed CE, AdamW
  (lr 2e-5, eps 1e-8), linear decay, clipping at 1.0.

Contenders run interleaved (A B C ... then rotated), several rounds, medians: on a shared
machine absolute times move with other processes' load, ratios within a round much less.

    GLUE_DIR=../shared/data/glue python -m benchmarks.trainer_speed --task sst2 --rows 320 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from eebench.model.accel import autocast, cpu_info, machine_info


@dataclass
class Setup:
    task: str
    rows: int
    batch_size: int = 32
    max_seq_length: int = 128
    seed: int = 42


def load_rows(setup: Setup):
    """(train tokenized, 8-row dev tokenized, tokenizer, backbone path): the first ``rows`` rows."""
    from transformers import AutoTokenizer

    from eebench.data import get_task, load_task, tokenize
    from eebench.model.backbone import resolve_model

    spec = get_task(setup.task)
    path, _ = resolve_model("minilm-l6")
    tok = AutoTokenizer.from_pretrained(path)
    train = load_task(setup.task, spec.train_split).select(range(setup.rows))
    dev = load_task(setup.task, spec.eval_split).select(range(8))
    return (tokenize(train, tok, spec, setup.max_seq_length), tokenize(dev, tok, spec, setup.max_seq_length),
            tok, spec, path)


class BareModel(nn.Module):
    """A backbone from ``AutoModel`` plus one mean-pooled linear exit per layer."""

    def __init__(self, path: str, attn: str, num_labels: int):
        from transformers import AutoModel

        super().__init__()
        self.backbone = AutoModel.from_pretrained(path, attn_implementation=attn)
        h, m = self.backbone.config.hidden_size, self.backbone.config.num_hidden_layers
        self.heads = nn.ModuleList(nn.Linear(h, num_labels) for _ in range(m))
        self.dropout = nn.Dropout(self.backbone.config.hidden_dropout_prob)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        states = self.backbone(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                               output_hidden_states=True).hidden_states[1:]
        w = attention_mask.unsqueeze(-1).to(states[0].dtype)
        return [head(self.dropout((s * w).sum(1) / w.sum(1))) for head, s in zip(self.heads, states, strict=True)]


def bare_epoch(model: BareModel, train, tok, setup: Setup, precision: str = "fp32") -> float:
    """One epoch of the bare loop over eebench's batches; returns seconds."""
    from eebench.data import make_loader

    model.train()
    loader = make_loader(train, tok, setup.batch_size, shuffle=True, seed=setup.seed * 1000, group_by_length=False)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, eps=1e-8, weight_decay=0.0)
    total = len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / total))
    ce = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    for batch in loader:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        with autocast("cpu", precision):
            logits = model(**inputs)
        loss = sum(ce(lg.float(), batch["labels"]) for lg in logits)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def trainer_epoch(model, train, dev, tok, spec, setup: Setup, precision: str = "fp32") -> float:
    """One epoch through eebench's Trainer (vanilla strategy); returns its training seconds."""
    from eebench.strategy import build_strategy
    from eebench.training.trainer import TrainConfig, Trainer

    cfg = TrainConfig(batch_size=setup.batch_size, seed=setup.seed, device="cpu", precision=precision,
                      group_by_length=False, progress=False, checkpoint_every=0, eval_batch_size=8)
    return Trainer(model, build_strategy("vanilla"), cfg, tok, spec).train(train, dev).train_seconds


def measure(setup: Setup, contenders: list[str], rounds: int = 3, log=print) -> dict:
    """Interleaved rounds of one epoch per contender; contenders are ``trainer-<attn>-<precision>``
    or ``bare-<attn>-<precision>``. Returns per-contender times, medians and samples/s."""
    from eebench.model.backbone import MultiExitConfig, MultiExitModel

    train, dev, tok, spec, path = load_rows(setup)
    models = {}
    for name in contenders:
        kind, attn, _ = name.split("-")
        torch.manual_seed(setup.seed)
        if kind == "trainer":
            models[name] = MultiExitModel.from_config(MultiExitConfig(model="minilm-l6", num_labels=spec.num_labels,
                                                                      attn_implementation=attn))
        else:
            models[name] = BareModel(path, attn, spec.num_labels)

    def run(name: str) -> float:
        kind, _, precision = name.split("-")
        if kind == "trainer":
            return trainer_epoch(models[name], train, dev, tok, spec, setup, precision)
        return bare_epoch(models[name], train, tok, setup, precision)

    for name in contenders:  # warm-up: first-call kernel selection, allocator
        run(name)
    times: dict[str, list[float]] = {n: [] for n in contenders}
    cpu: dict[str, list[float]] = {n: [] for n in contenders}  # process CPU time: a cross-check under load
    order = list(contenders)
    for r in range(rounds):
        for name in order:
            c0 = time.process_time()
            times[name].append(run(name))
            cpu[name].append(time.process_time() - c0)
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.1f} s" for n in contenders))
        order.append(order.pop(0))  # rotate: nobody always runs first
    med = {n: statistics.median(v) for n, v in times.items()}
    lengths = [len(x) for x in train["input_ids"]]
    return {"task": setup.task, "rows": setup.rows, "batch_size": setup.batch_size, "rounds": rounds,
            "mean_tokens": sum(lengths) / len(lengths), "times_s": times, "median_s": med,
            "cpu_s": cpu, "median_cpu_s": {n: statistics.median(v) for n, v in cpu.items()},
            "samples_per_s": {n: setup.rows / v for n, v in med.items()},
            "machine": machine_info("cpu"), "load_avg": os.getloadavg()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="sst2")
    p.add_argument("--rows", type=int, default=320)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--contenders", default="trainer-eager-fp32,bare-eager-fp32,bare-sdpa-fp32,trainer-sdpa-fp32"
                   + (",trainer-eager-bf16" if cpu_info().native_bf16 else ""))
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = measure(Setup(args.task, args.rows), args.contenders.split(","), args.rounds)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
