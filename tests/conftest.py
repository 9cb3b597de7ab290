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
    from eebench.model.backbone import MultiExitConfig, MultiExitModel

    torch.manual_seed(seed)
    cfg = MultiExitConfig(model=f"tiny-{arch}", num_labels=num_labels, pooling=pooling,
                          backbone_config=TINY_CONFIGS[arch], **kw)
    return MultiExitModel.from_config(cfg).eval()


def interrupted_at_step(monkeypatch, n: int, train) -> int:
    """Run ``train()`` with the ``n``-th AdamW step raising KeyboardInterrupt (a kill in the middle
    of training); the real step is restored afterwards. Returns the number of steps attempted."""
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def dying_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    try:
        with pytest.raises(KeyboardInterrupt):
            train()
    finally:
        monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    return calls["n"]


def checkpoint_state(ckpt) -> dict:
    """The trainer_state.json of the generation a checkpoint folder's pointer names."""
    import json

    return json.loads((ckpt / json.loads((ckpt / "current.json").read_text())["generation"] / "trainer_state.json").read_text())


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


# ----------------------------------------------------------------------------- tiny real-format fixtures

POS_WORDS = ["good", "great", "fine", "superb", "lovely", "nice"]
NEG_WORDS = ["bad", "awful", "poor", "dull", "ugly", "boring"]
FILLER = ["the", "a", "movie", "film", "plot", "actor", "was", "is", "very", "quite", "and", "story", "scene", "it"]


def write_tiny_backbone(d, arch: str = "bert", seed: int = 0):
    """A tiny random BERT-style encoder + WordPiece tokenizer saved as a Hugging Face folder."""
    from pathlib import Path

    from transformers import AutoConfig, AutoModel, BertTokenizer

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POS_WORDS + NEG_WORDS + FILLER
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab=str(d / "vocab.txt"), do_lower_case=True).save_pretrained(d)
    cfg = dict(TINY_CONFIGS[arch])
    cfg["vocab_size"] = len(vocab)
    torch.manual_seed(seed)
    AutoModel.from_config(AutoConfig.for_model(**cfg)).save_pretrained(d)
    return d


def write_toy_task(d, n_train: int = 96, n_dev: int = 48, seed: int = 0):
    """A learnable sentiment-like CSV task (label = whether positive words outnumber negative ones)."""
    import random
    from pathlib import Path

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)

    def rows(n):
        out = ["text,label"]
        for _ in range(n):
            y = rng.random() < 0.5
            words = rng.sample(FILLER, rng.randint(2, 6)) + [rng.choice(POS_WORDS if y else NEG_WORDS)]
            rng.shuffle(words)
            out.append(f"{' '.join(words)},{'pos' if y else 'neg'}")
        return "\n".join(out) + "\n"

    (d / "train.csv").write_text(rows(n_train))
    (d / "dev.csv").write_text(rows(n_dev))
    (d / "toy.yaml").write_text(
        "name: toy\n"
        "description: toy sentiment task for tests\n"
        "text_fields: [sentence]\n"
        "label_names: [neg, pos]\n"
        "label_map: {neg: 0, pos: 1}\n"
        "metrics: [accuracy, f1]\n"
        "main_metric: accuracy\n"
        "train_split: train\n"
        "eval_split: dev\n"
        "format:\n"
        "  type: csv\n"
        "  header: true\n"
        "  columns: {sentence: text, label: label}\n"
        "splits:\n"
        "  train: {file: train.csv}\n"
        "  dev: {file: dev.csv}\n"
    )
    return d / "toy.yaml"


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory):
    return write_tiny_backbone(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def toy_task(tmp_path):
    return write_toy_task(tmp_path / "toy")
