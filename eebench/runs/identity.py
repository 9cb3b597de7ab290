"""A cell's identity: everything that changes its numbers, resolved and hashed.

Two cells share an identity (and a folder ``<method>-s<seed>-<hash>``) exactly when they would
produce the same numbers; ``eebench run`` reuses a finished cell only when its recorded identity
is the one asked for.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from eebench.errors import EebenchError
from eebench.model.backbone import MultiExitConfig, resolve_model
from eebench.runs.config import RunConfig


def speed_settings(cfg: RunConfig) -> tuple[str, str]:
    """(attention implementation, precision) that a cell of ``cfg`` trains with on this machine:
    ``auto`` and a bf16 request on a CPU without native bf16 resolved (eebench.model.accel)."""
    from eebench.model.accel import choose_attn_implementation, resolve_precision
    from eebench.util import pick_device

    device = pick_device(cfg.device)
    return choose_attn_implementation(cfg.attn_implementation, device), resolve_precision(cfg.precision, device)[0]


#: RunConfig keys left out of a cell's identity, and why: what is run (the lists; one cell is one
#: method and one seed), where it runs and is logged (device: the same experiment on other
#: hardware; checkpoint_every: resuming is bit for bit), what is swept afterwards from the cached
#: logits (a sweep is redone when its grid changes), and data_dir (the data's fingerprints stand
#: for the data wherever it was read from). Every other key, present or future, is identity.
NOT_IDENTITY = frozenset({
    "include", "methods", "signals", "seeds", "method_params", "device", "checkpoint_every", "data_dir", "output",
    "tracking_uri", "no_mlflow", "num_thresholds", "confirm_thresholds", "progress", "keep_checkpoint",
    # how operating points are chosen from the cached logits: analysis settings, no number of the cell changes
    "cal_fraction", "folds", "split_repeats", "split_seed", "epsilon", "delta",
})


def resolve_model_settings(cfg: RunConfig, num_labels: int) -> dict[str, Any]:
    """The model settings a cell really uses: pooling and final pooling (the backbone's
    recommendation when not given), the number of kept layers K and the backbone's depth."""
    from transformers import AutoConfig

    mcfg = MultiExitConfig(model=cfg.model, num_labels=num_labels, pooling=cfg.pooling,
                           final_pooling=cfg.final_pooling, num_layers=cfg.num_layers).resolved()
    path, _ = resolve_model(cfg.model)
    try:
        total = int(AutoConfig.from_pretrained(path).num_hidden_layers)
    except (OSError, ValueError) as e:
        raise EebenchError(f"cannot load model {cfg.model!r} ({path}): {str(e).splitlines()[0]}") from None
    k = total if cfg.num_layers is None else cfg.num_layers
    if not 1 <= k <= total:
        raise EebenchError(f"--num-layers {k} is outside 1..{total} for model {cfg.model!r}")
    return {"pooling": mcfg.pooling, "final_pooling": mcfg.final_pooling, "num_layers": k, "backbone_layers": total}


def cell_config(cfg: RunConfig, method: str, seed: int, spec, method_params: dict, model_settings: dict,
                data_info: dict) -> dict[str, Any]:
    """A cell's identity: everything that changes its numbers, fully resolved.

    The run config with every default filled in (less ``NOT_IDENTITY``), the method's resolved
    hyper-parameters, the model's resolved pooling / head lr / micro-batch / layers, the task's
    metrics, the train and dev data fingerprints and eebench's ``MATHS_VERSION``. Two cells share
    an identity exactly when they would produce the same numbers."""
    from eebench import MATHS_VERSION

    attn, precision = speed_settings(cfg)  # as they will run, not as asked: both change the numbers
    ident = {k: v for k, v in cfg.model_dump().items() if k not in NOT_IDENTITY}
    ident.update({
        "attn_implementation": attn,
        "precision": precision,
        "maths_version": MATHS_VERSION,
        "task": spec.name,
        "method": method,
        "method_params": dict(sorted(method_params.items())),
        "seed": seed,
        "head_lr": cfg.lr if cfg.head_lr is None else cfg.head_lr,
        "micro_batch_size": cfg.micro_batch_size or cfg.batch_size,
        **model_settings,
        "main_metric": spec.main_metric,
        "metrics": list(spec.metrics),
        "train_split": spec.train_split,
        "eval_split": spec.eval_split,
        "train_fingerprint": data_info["train_fingerprint"],
        "dev_fingerprint": data_info["dev_fingerprint"],
        "train_rows": data_info["train_rows"],
        "dev_rows": data_info["dev_rows"],
    })
    return json.loads(json.dumps(ident, sort_keys=True, default=str))  # as it reads back from JSON


def cell_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def check_identity(d: Path, stored: dict, expected: dict) -> None:
    """Refuse to reuse a cell folder whose recorded identity is not ``expected``."""
    if stored == expected:
        return
    keys = sorted(k for k in set(stored) | set(expected) if stored.get(k, "<absent>") != expected.get(k, "<absent>"))
    raise EebenchError(f"cell folder {d} holds a cell of another configuration (differs in {', '.join(keys)}); "
                       "it is not reused: move or delete that folder and run again")
