"""``RunConfig``: every setting of ``eebench run`` (a YAML config file and ``key=value`` overrides
fill it). Its own module so that the reports can read its defaults without importing the runner."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator


class RunConfig(BaseModel):
    """Everything ``eebench run`` needs; a YAML config file and ``key=value`` overrides fill it."""

    model_config = {"extra": "forbid"}

    include: list[str] = Field(default_factory=list)  # plugin folders / files (--include), loaded by validate
    task: str = "sst2"
    methods: list[str] = Field(default_factory=lambda: ["cosee", "vanilla"])
    signals: list[str] = Field(default_factory=lambda: ["energy", "entropy", "softmax", "patience"])
    model: str = "minilm-l6"
    seeds: list[int] = Field(default_factory=lambda: [42])
    train_samples: int | None = Field(default=None, ge=1)
    train_subset: Literal["random", "first"] = "random"  # seeded random rows, or the first N rows
    eval_samples: int | None = Field(default=None, ge=1)
    max_seq_length: int = Field(default=128, ge=8)  # room for a pair's special tokens and some text
    epochs: int = Field(default=1, ge=1)
    lr: float = Field(default=2e-5, gt=0)
    head_lr: float | None = Field(default=None, gt=0)
    batch_size: int = Field(default=32, ge=1)
    micro_batch_size: int | None = Field(default=None, ge=1)
    pooling: str | None = None
    final_pooling: str | None = None
    num_layers: int | None = Field(default=None, ge=1)
    device: str = "auto"
    precision: str = "fp32"
    attn_implementation: str = "auto"  # auto | eager | sdpa (eebench.model.accel.choose_attn_implementation)
    group_by_length: bool = True
    checkpoint_every: int = Field(default=50, ge=0)
    keep_checkpoint: bool = False  # keep the optimiser checkpoint of a finished cell
    method_params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    data_dir: str | None = None
    output: str = "runs"
    tracking_uri: str | None = None
    no_mlflow: bool = False
    num_thresholds: int = Field(default=100, ge=1)
    confirm_thresholds: int = Field(default=3, ge=0)
    # Held-out operating points in the summaries (eebench.exits.operating); analysis only, not hashed.
    cal_fraction: float = 0.5
    folds: int | None = None
    split_repeats: int = 20
    split_seed: int = 0
    epsilon: float | None = None
    delta: float = 0.05
    progress: bool = True

    @field_validator("methods", "signals", "include", mode="before")
    @classmethod
    def _split(cls, v):
        return [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else v

    @field_validator("seeds", mode="before")
    @classmethod
    def _split_seeds(cls, v):
        if isinstance(v, str):
            return [int(s) for s in v.split(",") if s.strip()]
        return [v] if isinstance(v, int) else v
