"""Empirical check of eebench's finite-sample guarantee on a real cell's cached dev logits.

For each (epsilon, delta): over R random stratified splits of the dev set, choose the fastest
threshold certified on the calibration part (Clopper-Pearson, fixed-sequence testing) and count
how often the evaluation part breaks the promise (disagreement with the final layer > epsilon).

    python benchmarks/guarantee_check.py results/sst2-5k-mean/cells/vanilla-s42-25d5926ecde8.dev_logits.safetensors \
        --signal entropy --repeats 1000
"""

from __future__ import annotations

import argparse
import math

import torch
from safetensors.torch import load_file

from eebench.exits.operating import SplitSpec, Target, violation_check


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("logits", help="a dev_logits.safetensors file (keys logits [N, M, C], labels [N])")
    p.add_argument("--signal", default="entropy")
    p.add_argument("--repeats", type=int, default=1000)
    p.add_argument("--cal-fraction", type=float, default=0.5)
    p.add_argument("--grid", default="0.02:0.1,0.05:0.1,0.05:0.05,0.1:0.05", help="epsilon:delta pairs")
    p.add_argument("--correction", default="fixed-sequence")
    a = p.parse_args()
    torch.set_num_threads(1)  # small tensors: one thread is fastest, and kind to a shared machine
    d = load_file(a.logits)
    n = len(d["labels"])
    n_eval = n - round(a.cal_fraction * n)
    print(f"{a.logits}: {n} dev examples, {d['logits'].shape[1]} layers, signal {a.signal}, {a.repeats} splits, "
          f"calibration {a.cal_fraction:g}, {a.correction}, Clopper-Pearson")
    print("| epsilon | delta | violation rate on evaluation (95% CI) | mean eval risk | eval s.e. at epsilon | "
          "mean eval speed-up | mean eval accuracy |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for pair in a.grid.split(","):
        eps, delta = (float(x) for x in pair.split(":"))
        t = Target(epsilon=eps, delta=delta, correction=a.correction)
        r = violation_check(d["logits"], d["labels"], a.signal, t, SplitSpec(a.cal_fraction, None, a.repeats, 0))
        se = math.sqrt(eps * (1 - eps) / n_eval)
        print(f"| {eps:g} | {delta:g} | {r['rate']:.3f} ({r['rate_ci95'][0]:.3f}-{r['rate_ci95'][1]:.3f}) | "
              f"{r['mean_eval_risk']:.4f} | {se:.4f} | {r['mean_eval_speedup']:.3f}x ± {r['std_eval_speedup']:.3f} | "
              f"{r['mean_eval_metric']:.4f} |")


if __name__ == "__main__":
    main()
