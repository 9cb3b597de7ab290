"""Inference, beside the training flow, read top-down:

- ``engine``: ``EarlyExitEngine`` (single, batched, streaming) and ``early_exit``, true layer-by-layer
  early exit through the model's ``LayerStepper`` and an exit policy;
- ``thresholds``: one pass over examples and the threshold for a target speed-up;
- ``bench``: latency / throughput of every mode against the full model.

The names below are the package's public surface.
"""

from eebench.inference.bench import bench, format_bench, signal_overhead
from eebench.inference.engine import (
    MODES,
    EarlyExitEngine,
    EngineOutput,
    Example,
    collate,
    early_exit,
    prepare_examples,
)
from eebench.inference.thresholds import ThresholdChoice, one_pass_logits, one_pass_scores, pick_threshold

__all__ = ["MODES", "Example", "prepare_examples", "collate", "EngineOutput", "EarlyExitEngine", "early_exit",
           "ThresholdChoice", "one_pass_logits", "one_pass_scores", "pick_threshold", "bench", "format_bench",
           "signal_overhead"]
