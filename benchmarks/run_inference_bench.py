"""Wall-clock early-exit benchmark on MiniLM-L6 and SST-2 dev: prints bench's markdown table.

    GLUE_DIR=/work/shared/data/glue HF_HUB_OFFLINE=1 python benchmarks/run_inference_bench.py \
        --limit 872 --signal energy --target-speedup 2 --batch-size 32 --repeats 5 --threads 1

The MiniLM exit heads are untrained here (random), so the threshold is picked from the one-pass
logits of the same inputs for the target layer speed-up; wall-clock figures do not depend on
the heads being trained, only on how many layers each input runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import torch


def load_sst2(limit: int | None = None) -> list[str]:
    """SST-2 dev sentences from $GLUE_DIR/SST-2/dev.tsv (tab-separated, header sentence/label)."""
    glue = os.environ.get("GLUE_DIR")
    if not glue:
        raise SystemExit("set GLUE_DIR to the GLUE data folder (with SST-2/dev.tsv)")
    with open(Path(glue) / "SST-2" / "dev.tsv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    sentences = [r["sentence"] for r in rows]
    return sentences[:limit] if limit else sentences


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    from eebench.inference import bench, format_bench
    from eebench.model.backbone import MultiExitConfig, MultiExitModel, resolve_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--limit", type=int, default=None, help="first N dev sentences (default: all 872)")
    p.add_argument("--signal", default="energy")
    p.add_argument("--target-speedup", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--overhead-inputs", type=int, default=128)
    p.add_argument("--segment", type=int, default=None, help="inputs per interleaved segment (default 8 x batch)")
    p.add_argument("--input-order", action="store_true", help="batch in input order instead of shortest first")
    p.add_argument("--seed", type=int, default=0, help="seed of the (untrained) exit heads")
    p.add_argument("--split-gain", type=float, default=None,
                   help="streaming's padding-aware split (default: the engine's, 0.05; 0: full batches only)")
    p.add_argument("--json", type=Path, default=None, help="also write the result dict here")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    model = MultiExitModel.from_config(MultiExitConfig(model=args.model))
    tok = AutoTokenizer.from_pretrained(resolve_model(args.model)[0])
    examples = [dict(tok(s, truncation=True, max_length=128)) for s in load_sst2(args.limit)]
    result = bench(
        model, examples, args.signal, target_speedup=args.target_speedup, batch_size=args.batch_size,
        repeats=args.repeats, warmup=args.warmup, threads=args.threads, overhead_inputs=args.overhead_inputs,
        segment=args.segment, sort_by_length=not args.input_order,
        **({} if args.split_gain is None else {"split_gain": args.split_gain}),
    )
    print(format_bench(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
