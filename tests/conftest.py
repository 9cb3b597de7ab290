"""Shared fixtures: offline environment, tiny random models of several architectures."""

import os

# Nothing the tests run may reach the network: set before transformers / datasets / mlflow import.
for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ[_k] = _v

import pytest  # noqa: E402
import torch  # noqa: E402

_BASE = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37,
             vocab_size=100, max_position_embeddings=64)

TINY_CONFIGS = {
    "bert": dict(model_type="bert", **_BASE),
    "albert": dict(model_type="albert", embedding_size=16, **_BASE),
    "roberta": dict(model_type="roberta", pad_token_id=1, **_BASE),
    "electra": dict(model_type="electra", embedding_size=16, **_BASE),
    "mpnet": dict(model_type="mpnet", **_BASE),
    "distilbert": dict(model_type="distilbert", dim=32, n_layers=4, n_heads=4, hidden_dim=37, vocab_size=100,
                       max_position_embeddings=64),
}

GLUE_DIR = os.environ.get("GLUE_DIR")
needs_glue = pytest.mark.skipif(not GLUE_DIR or not os.path.isdir(GLUE_DIR), reason="GLUE_DIR is not set")


def tiny_model(arch: str = "bert", num_labels: int = 2, pooling: str = "cls", seed: int = 0, **kw):
    from eebench.models import MultiExitConfig, MultiExitModel

    torch.manual_seed(seed)
    cfg = MultiExitConfig(model=f"tiny-{arch}", num_labels=num_labels, pooling=pooling,
                          backbone_config=TINY_CONFIGS[arch], **kw)
    return MultiExitModel.from_config(cfg).eval()


def padded_batch(n: int = 8, length: int = 12, seed: int = 0, vocab: int = 100):
    """Random token ids with a few padded rows (lengths vary from 3 to ``length``)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, length), generator=g)
    lengths = torch.randint(3, length + 1, (n,), generator=g)
    lengths[0] = length
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    return ids, mask


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
