"""``consistentee``: ConsistentEE (Zeng, Hong, Dai, Zhuang, Chen, AAAI 2024), as the official code
(ZeroNLP/ConsistentEE @cd810c7) with the paper's reward as an option.

Documented in docs/methods.md, "ConsistentEE".

* **Policy networks** (``model.extras["policy"]``, one per layer): pi_i = sigmoid(Linear 32->1(
  GELU(Linear H->32(pool_i)))), P(exit at layer i). pool_i is the exit's pooled vector before the
  classifier's dropout (no dropout, not detached). The paper's exits read the shared pretrained
  pooler: ``--pooling pooler``; with other poolings say so in a write-up.
* **Three phases** (the code's ``--mode`` 1, 2, 3, in sequence; each ``epochs`` x the run's epochs):
  1. ``warmup``: backbone + every exit head with PABEE-weighted CE, sum_i i CE_i / sum_i i
     (policy networks frozen);
  2. ``policy``: only the policy networks learn (REINFORCE); everything else is frozen but keeps
     dropout (train mode), so that the K copies differ;
  3. ``joint``: everything learns; loss = mean over copies of the CE at each copy's exit layer (the
     other heads get no gradient from it: "each instance only needs to be predicted correctly by
     one classifier") + the policy loss, whose gradient reaches the backbone through pool_i.
* **Rollout** (phases 2 and 3): each row is repeated ``copies`` = K = 8 times in one pass
  (``Strategy.batch_copies``), so the copies differ by dropout noise. Actions at layers 1..M:
  greedy a_i = [pi_i > 0.5] (the code: its epsilon-greedy has EPS_START = EPS_END = 0), or with
  ``sample_actions=true`` a_i ~ Bernoulli(pi_i) (the paper's reading), drawn from the trainer's
  torch generator (seeded by the run seed, saved in every checkpoint: reproducible and resumed bit
  for bit). Exit layer t = the first i with a_i = 1, else M. log pi(traj) = sum_{l<t} log(1 - pi_l)
  + log pi_t, or sum_{l<=M} log(1 - pi_l) when no layer says exit; accumulated from zeros (the
  code starts from torch.randn, a constant without gradient).
* **Reward** (``reward``; no gradient): ``ce`` (default, the released code's train_rl /
  train_both): r = -ce_t; ``hardness`` (the paper, whose exact formula is unverified; the code's
  commented-out variant): r = -ce_t - alpha * t * (1 - m(x)/M), with m(x) the memorised layer of
  training row x; ``depth`` (the code's train_alternate): r = -ce_t - alpha * t. The memorised
  layer (smallest l such that every exit l..M predicts the gold label; M when the last exit is
  wrong) is computed with the warm-up model on the training set in eval mode when the policy phase
  starts (``on_phase_start``) and kept in the strategy's state (checkpointed).
* **Advantage**: A = r - mean of r over the K copies of the same row; L_pi = -mean(A log pi(traj)).
* **Exit**: policy ``pi-exit``, leave at the first layer i < M with pi_i > 0.5 (strict), else at
  M. It is a router: the 0.5 is part of the method, not a knob, so the policy declares a fixed
  operating point (``ExitPolicy.fixed_threshold``): one (speed-up, metric) point per model in
  sweeps, reports and ``eebench bench``. Speed is traded by retraining with another ``alpha``
  (``reward=hardness`` or ``depth``).

Differences from the official code: one learning rate per parameter group for the whole run (the
code restarts with lr 1e-5 / 3e-4 / 3e-5 per mode; here the body uses the run's ``--lr`` in every
phase and the policy networks ``policy_lr`` = 3e-4); the three modes share the run's batch size
and epochs (the code: 16 / 32 / 32 and 5 / 2 / 2 epochs; ``warmup_epochs`` etc. scale them);
the per-sample final-exit CE "hardness" file the code writes but never reads is not produced.
Per-task alpha values are unknown (code comments: 0.01-0.08, "RTE: 0.035").
"""

from __future__ import annotations

import torch
from torch import nn

from eebench.api import EebenchError, ExitPolicy, Phase, StepContext, Strategy, per_layer_ce, register_method

__all__ = ["PolicyNet", "memorized_layer", "trajectory", "advantages", "rewards", "PiExit", "ConsistentEE"]

REWARDS = ("ce", "hardness", "depth")


class PolicyNet(nn.Module):
    """P(exit) of one layer: [..., H] -> Linear H->32 -> GELU -> Linear 32->1 -> sigmoid -> [...]."""

    def __init__(self, hidden_size: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, 1))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(pooled)).squeeze(-1)


def exit_probs(policy: nn.ModuleList, pooled: torch.Tensor) -> torch.Tensor:
    """pi [N, M] from the pooled exit vectors [N, M, H], layer by layer ([N, H] each: the same
    operation the engine runs after every layer)."""
    return torch.stack([policy[i](pooled[:, i]) for i in range(pooled.shape[1])], 1)


def memorized_layer(correct: torch.Tensor) -> torch.Tensor:
    """1-based memorised layer [N] from per-layer correctness [N, M] (bool): the smallest l such
    that exits l..M are all right; M when the last exit is wrong."""
    m = correct.shape[1]
    trailing = correct.flip(1).long().cumprod(1).sum(1)  # how many exits at the end are all right
    return (m - trailing + 1).clamp(max=m)


def trajectory(pi: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(exit layer t [N], 1-based; log pi(traj) [N]) of exit decisions ``actions`` [N, M] (bool)
    under probabilities ``pi`` [N, M]: t = the first layer whose action is "exit", else M;
    log pi = sum_{l<t} log(1 - pi_l) + log pi_t, or sum_{l<=M} log(1 - pi_l) when none exits."""
    n, m = pi.shape
    exited = actions.any(1)
    first = actions.to(torch.uint8).argmax(1)  # 0-based first exit (0 when none)
    t = torch.where(exited, first + 1, torch.full_like(first, m))
    layer = torch.arange(m, device=pi.device).unsqueeze(0)
    before = layer < first.unsqueeze(1)  # continue decisions before the exit
    stay = torch.where(exited.unsqueeze(1), before, torch.ones_like(before))  # no exit: every layer continued
    eps = torch.finfo(pi.dtype).tiny
    log_stay = (torch.log1p(-pi).clamp_min(torch.finfo(pi.dtype).min) * stay).sum(1)
    log_exit = torch.log(pi.gather(1, first.unsqueeze(1)).squeeze(1).clamp_min(eps))
    return t, log_stay + torch.where(exited, log_exit, torch.zeros_like(log_exit))


def rewards(ce_at_exit: torch.Tensor, t: torch.Tensor, num_layers: int, kind: str = "ce", alpha: float = 0.0,
            memorized: torch.Tensor | None = None) -> torch.Tensor:
    """Reward [N] (detached): ``ce``: -ce_t; ``hardness``: -ce_t - alpha t (1 - m/M); ``depth``:
    -ce_t - alpha t."""
    r = -ce_at_exit.detach().float()
    if kind == "ce":
        return r
    if kind == "depth":
        return r - alpha * t.float()
    if kind == "hardness":
        if memorized is None:
            raise EebenchError("reward=hardness needs the memorised layer of every training row")
        return r - alpha * t.float() * (1 - memorized.float() / num_layers)
    raise EebenchError(f"consistentee.reward={kind!r}; known: {', '.join(REWARDS)}")


def advantages(r: torch.Tensor, copies: int) -> torch.Tensor:
    """A = r - mean of r over the ``copies`` adjacent copies of each row: [N * K] -> [N * K]."""
    g = r.view(-1, copies)
    return (g - g.mean(1, keepdim=True)).reshape(-1)


class PiExit(ExitPolicy):
    """ConsistentEE's router: leave at the first layer i < M with pi_i > 0.5 (strict). A fixed
    operating point: the 0.5 is part of the method, not a threshold to tune."""

    name = "pi-exit"
    higher_is_easier = True
    strict = True
    uses_model = True
    fixed_threshold = 0.5

    def scores(self, out) -> torch.Tensor:
        return exit_probs(self.model.extras["policy"], out.pooled)

    def step(self, layer, logits, features, state):
        return self.model.extras["policy"][layer](features), None


@register_method("consistentee", "ConsistentEE: per-layer policy networks, PABEE warm-up -> REINFORCE -> joint "
                 "(official code; exit policy pi-exit, one fixed operating point); exits as the paper: --pooling pooler")
class ConsistentEE(Strategy):
    defaults = {"copies": 8, "reward": "ce", "alpha": 0.02, "sample_actions": False, "policy_lr": 3e-4,
                "policy_width": 32, "warmup_epochs": 1, "policy_epochs": 1, "joint_epochs": 1}

    def __init__(self, name: str, **hparams):
        super().__init__(name, **hparams)
        if self.hparams["reward"] not in REWARDS:
            raise EebenchError(f"{name}.reward={self.hparams['reward']!r}; known: {', '.join(REWARDS)}")
        for k in ("copies", "warmup_epochs", "policy_epochs", "joint_epochs", "policy_width"):
            if int(self.hparams[k]) < 1:
                raise EebenchError(f"{name}.{k}={self.hparams[k]!r} must be an integer >= 1")
        #: memorised layer of every training row (reward=hardness), by position in the training set
        self.memorized: torch.Tensor | None = None

    # -- contract ------------------------------------------------------------------------
    def modules(self, model) -> dict[str, nn.Module]:
        h = model.heads.classifiers[0].in_features
        width = int(self.hparams["policy_width"])
        return {"policy": nn.ModuleList(PolicyNet(h, width) for _ in range(model.num_layers))}

    def param_groups(self) -> dict[str, dict]:
        return {"policy": {"prefixes": ["extras.policy."], "lr": float(self.hparams["policy_lr"])}}

    def phases(self) -> list[Phase]:
        h = self.hparams
        return [Phase("warmup", trainable=["backbone", "internal", "final"], epochs_factor=int(h["warmup_epochs"])),
                Phase("policy", trainable=["extras.policy"], epochs_factor=int(h["policy_epochs"])),
                Phase("joint", trainable="all", epochs_factor=int(h["joint_epochs"]))]

    def policies(self) -> dict[str, type[ExitPolicy]]:
        return {"pi-exit": PiExit}

    def batch_copies(self, ctx: StepContext) -> int:
        return 1 if ctx.phase == 0 else int(self.hparams["copies"])

    def on_phase_start(self, index: int, phase, trainer, train_ds) -> None:
        if index == 1 and self.hparams["reward"] == "hardness":
            # the warm-up model, on the training set, in eval mode (the official code)
            logits, labels = trainer.collect(train_ds)
            self.memorized = memorized_layer(logits.argmax(-1) == labels.unsqueeze(1))

    def state_dict(self) -> dict:
        return {} if self.memorized is None else {"memorized": self.memorized.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.memorized = torch.tensor(state["memorized"], dtype=torch.long) if "memorized" in state else None

    def compute_loss(self, out, labels: torch.Tensor, ctx: StepContext):
        logits = out.logits.float()
        n, m, _ = logits.shape
        ce = per_layer_ce(logits, labels)  # [N, M]
        if ctx.phase == 0:  # PABEE-weighted CE: sum_i i CE_i / sum_i i
            w = torch.arange(1, m + 1, dtype=ce.dtype, device=ce.device)
            loss = (ce.mean(0) * w).sum() / w.sum()
            return loss, {"ce_per_layer": ce.mean(0).detach()}
        pi = exit_probs(self.model.extras["policy"], out.pooled.float())
        with torch.no_grad():
            actions = torch.bernoulli(pi).bool() if self.hparams["sample_actions"] else pi > 0.5
        t, logp = trajectory(pi, actions)
        ce_t = ce.gather(1, (t - 1).unsqueeze(1)).squeeze(1)
        memorized = None
        if self.hparams["reward"] == "hardness":
            if self.memorized is None or ctx.rows is None:
                raise EebenchError("consistentee.reward=hardness needs the memorised layers of the training rows "
                                   "(computed when the policy phase starts, in the trainer)")
            memorized = self.memorized.to(t.device)[ctx.rows.to(t.device)]
        r = rewards(ce_t, t, m, self.hparams["reward"], float(self.hparams["alpha"]), memorized)
        adv = advantages(r, ctx.copies)
        l_pi = -(adv * logp).mean()
        logs = {"l_pi": l_pi.detach(), "mean_exit_layer": t.float().mean().detach(), "reward": r.mean()}
        if ctx.phase == 1:
            return l_pi, logs
        l_ce = ce_t.mean()
        logs["ce_at_exit"] = l_ce.detach()
        return l_ce + l_pi, logs
