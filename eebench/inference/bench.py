"""Latency and throughput of every engine mode against the full model (all layers, final head
only): ``bench`` returns a JSON-ready dict, ``format_bench`` renders it as a markdown table.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from collections.abc import Sequence

import torch

from eebench.errors import EebenchError
from eebench.exits.metrics import exit_counts
from eebench.exits.policies import get_policy
from eebench.exits.rule import exit_layers_from_scores, predictions_at_exit
from eebench.exits.signals import Signal
from eebench.inference.engine import (
    MODES,
    SPLIT_GAIN,
    EarlyExitEngine,
    _check_batch,
    _unbatched,
    prepare_examples,
)
from eebench.inference.thresholds import one_pass_scores, pick_threshold
from eebench.model.accel import autocast, describe_cpu, machine_info, resolve_precision
from eebench.model.backbone import MultiExitModel

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
                comb = engine._combiner
                hs = None if comb is None else comb.begin()
                for i in range(m - 1):
                    t0 = clock()
                    hidden = layer(i, hidden, state)
                    _sync(dev)
                    t1 = clock()
                    feats, logits = heads[i](hidden, None)
                    if comb is not None:  # GPFEE's gated classifier is part of its exit head
                        logits, hs = comb.step(i, feats, hs)
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
    split_gain: float | None = SPLIT_GAIN,
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
    ``split_gain``: streaming's padding-aware split (``EarlyExitEngine``; None: full batches only).

    Returns a JSON-serialisable dict with keys ``model``, ``signal``, ``num_layers``,
    ``num_inputs``, ``mean_tokens``, ``batch_size``, ``segment``, ``sort_by_length``, ``threads``, ``repeats``,
    ``warmup``, ``device``, ``torch``, ``platform``, ``precision`` (as run), ``attn_implementation``, ``machine``
    (``eebench.model.accel.machine_info``: CPU model and flags, native bf16, threads), ``full`` ({``single``, ``batched``}),
    ``runs`` (one dict per threshold: ``threshold``, ``target_speedup``, ``layer_speedup``,
    ``exit_counts``, ``matches_simulation`` {mode: {``exit_layers``, ``predictions``} agreement
    fractions}, ``scalar_share`` (the share of batch-size-1 decisions taken from the signal's
    float64 scalar form, ``Signal.scalar``; None without one), ``single``, ``batched``, ``streaming``, ``wall_speedup`` {mode: spread},
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
        engines = [EarlyExitEngine(model, sig, r["threshold"], device, precision, split_gain) for r in runs]
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
            before = list(eng.scalar_decisions)
            outs = {mode: eng.run(items, mode, b, sort_by_length=sort_by_length) for mode in MODES}
            fast, slow = (x - y for x, y in zip(eng.scalar_decisions, before, strict=True))
            # The share of batch-size-1 decisions taken from the signal's float64 scalar form
            # (the rest computed the float32 kernels: values within the bound of the threshold);
            # None: the policy has no scalar form.
            run["scalar_share"] = fast / (fast + slow) if eng._scalar is not None and fast + slow else None
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
            "split_gain": split_gain or None,
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
        f"(median (min-max)), torch {result['torch']}"
        + ("" if "split_gain" not in result else
           f"; streaming splits a batch by length when that saves > {100 * result['split_gain']:g}% of its padded tokens"
           if result["split_gain"] else "; streaming runs full batches only (no length split)"),
    ]
    if "machine" in result:  # results written before precision / attention were recorded lack these
        mach = result["machine"]
        lines.append(f"precision {result['precision']}, attention {result['attn_implementation']}, CPU "
                     f"{describe_cpu(mach)}; flags: {', '.join(mach['cpu_flags']) or 'none of interest'}; "
                     f"native bf16: {'yes' if mach['native_bf16'] else 'no'}")
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
        if run.get("scalar_share") is not None:
            lines += [f"batch-1 decisions taken from the signal's float64 scalar form (the rest from its "
                      f"float32 kernels, values near the threshold): {100 * run['scalar_share']:.2f}%"]
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
