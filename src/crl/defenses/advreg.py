"""Adversarial regularization (Nasr, Shokri & Houmansadr, CCS 2018): min-max training.

An inference model h(posterior, one-hot label) -> P(member) is trained (Adam) to tell members
from a reference set of non-members; the classifier minimises CE + alpha * E_members[log h],
i.e. it is pushed to make its members look like non-members to h (Nasr et al., Algorithm 1).

Reference set: the paper's defender holds a reference set of non-members. Here it is carved out
of the MEMBERS (`ref_fraction` of ctx.train_idx, stratified): the model trains on fewer samples
(the data cost the CRL paper points out), and the target pool's non-members stay untouched for
the audit.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from crl.defenses._common import Means, check_int, check_number, split_members
from crl.defenses.base import Defense, FitContext
from crl.errors import CRLError
from crl.registry import DEFENSES

_SALT = 7201


class InferenceModel(nn.Module):
    """Nasr et al.'s inference model: the (unsorted) posterior through 1024-512-64, the one-hot
    label through 128-64, both concatenated through 256-128-64-1. Returns one logit per sample
    (sigmoid -> P(member)). PyTorch's default initialisation."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.posterior = nn.Sequential(
            nn.Linear(num_classes, 1024), nn.ReLU(),
            nn.Linear(1024, 512), nn.ReLU(),
            nn.Linear(512, 64), nn.ReLU(),
        )
        self.label = nn.Sequential(
            nn.Linear(num_classes, 128), nn.ReLU(),
            nn.Linear(128, 64), nn.ReLU(),
        )
        self.combine = nn.Sequential(
            nn.Linear(128, 256), nn.ReLU(),
            nn.Linear(256, 128), nn.ReLU(),
            nn.Linear(128, 64), nn.ReLU(),
            nn.Linear(64, 1),
        )

    def forward(self, probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(labels, self.num_classes).to(probs.dtype)
        h = torch.cat([self.posterior(probs), self.label(onehot)], dim=1)
        return self.combine(h).squeeze(1)


@DEFENSES.register("advreg")
class AdvReg(Defense):
    """AdvReg: `k` Adam steps of the inference model before each classifier step, then
    loss = CE + alpha * mean log h(member batch).

    extra_metrics(): attack_acc (inference accuracy on the balanced member/reference batches it
    trains on, measured before each update) and attack_gain (its log-likelihood gain).
    """

    name = "advreg"
    defaults: dict[str, Any] = {"alpha": 1.0, "k": 1, "attack_lr": 1e-3, "ref_fraction": 0.2}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        p = self.params
        p["alpha"] = check_number(self.name, "alpha", p["alpha"], low=0.0)
        p["k"] = check_int(self.name, "k", p["k"])
        p["attack_lr"] = check_number(self.name, "attack_lr", p["attack_lr"], low=0.0,
                                      low_open=True)
        p["ref_fraction"] = check_number(self.name, "ref_fraction", p["ref_fraction"],
                                         low=0.0, high=1.0, low_open=True, high_open=True)
        self.attack: InferenceModel | None = None
        self.attack_opt: torch.optim.Optimizer | None = None
        self.ref_idx: torch.Tensor | None = None
        self.member_idx: torch.Tensor | None = None
        self.gen: torch.Generator | None = None
        self._means = Means()
        self._last_acc: float | None = None

    def prepare(self, ctx: FitContext) -> None:
        kept, self.ref_idx = split_members(
            ctx.train_idx, ctx.y, self.params["ref_fraction"], seed=ctx.seed,
            salt=_SALT, owner=self.name, param="ref_fraction")
        ctx.train_idx = self.member_idx = kept
        with torch.random.fork_rng(devices=[]):   # seeded init, global RNG left as it was
            torch.manual_seed(int(ctx.seed) * 1000 + _SALT)
            self.attack = InferenceModel(ctx.num_classes)
        self.attack.to(ctx.device)
        self.attack_opt = torch.optim.Adam(self.attack.parameters(), lr=self.params["attack_lr"])
        self.gen = torch.Generator().manual_seed(int(ctx.seed) * 1000 + _SALT + 1)
        self._means = Means()

    def _draw(self, pool: torch.Tensor, m: int) -> torch.Tensor:
        return pool[torch.randperm(pool.numel(), generator=self.gen)[:m]]

    @torch.no_grad()
    def _posteriors(self, ctx: FitContext, idx: torch.Tensor) -> torch.Tensor:
        return F.softmax(ctx.model(ctx.batch_inputs(idx)).float(), dim=1)

    def before_step(self, ctx: FitContext, x: torch.Tensor, y: torch.Tensor, epoch: int) -> None:
        """k inner steps: ascend the inference gain on a member batch vs a reference batch.

        Both batches are drawn here from the index pools, without augmentation and with the
        model in eval mode (what an attacker querying the released model sees), so the
        inference model cannot key on augmentation or dropout."""
        if self.attack is None:
            raise CRLError(f"defense '{self.name}' used before prepare(ctx); call prepare first")
        m = min(x.shape[0], self.ref_idx.numel(), ctx.train_idx.numel())
        model = ctx.model
        was_training = model.training
        model.eval()
        batches = []
        for _ in range(self.params["k"]):
            mem, ref = self._draw(ctx.train_idx, m), self._draw(self.ref_idx, m)
            batches.append((self._posteriors(ctx, mem), ctx.y[mem].to(ctx.device),
                            self._posteriors(ctx, ref), ctx.y[ref].to(ctx.device)))
        model.train(was_training)
        self.attack.train()
        for p_in, y_in, p_out, y_out in batches:
            self.attack_opt.zero_grad(set_to_none=True)
            z_in, z_out = self.attack(p_in, y_in), self.attack(p_out, y_out)
            # gain = mean log h(members) + mean log(1 - h(reference)); minimise its negative
            gain = F.logsigmoid(z_in).mean() + F.logsigmoid(-z_out).mean()
            (-gain).backward()
            self.attack_opt.step()
            acc = 0.5 * (float((z_in > 0).float().mean()) + float((z_out <= 0).float().mean()))
            self._means.add(attack_acc=acc, attack_gain=gain.detach())
            self._last_acc = acc

    def loss(self, logits: torch.Tensor, features: torch.Tensor | None, targets: torch.Tensor,
             epoch: int) -> torch.Tensor:
        if self.attack is None:
            raise CRLError(f"defense '{self.name}' used before prepare(ctx); call prepare first")
        ce = F.cross_entropy(logits, targets)
        # The inference model is frozen for the classifier step: detached parameters, so this
        # term's gradient reaches only the classifier.
        frozen = {n: p.detach() for n, p in self.attack.named_parameters()}
        z = functional_call(self.attack, frozen, (F.softmax(logits, dim=1), targets))
        member_term = F.logsigmoid(z).mean()
        self._means.add(l_ce=ce.detach(), member_log_h=member_term.detach())
        return ce + self.params["alpha"] * member_term

    def extra_metrics(self) -> dict[str, float]:
        return self._means.pop()

    def report(self) -> dict[str, Any]:
        return {
            "n_train": int(self.member_idx.numel()) if self.member_idx is not None else None,
            "n_reference": int(self.ref_idx.numel()) if self.ref_idx is not None else None,
            "final_attack_acc": self._last_acc,
            "inference_model": "Nasr et al. 2018: posterior 1024-512-64 + label 128-64 -> "
                               "256-128-64-1",
        }

    def state_dict(self) -> dict[str, Any]:
        if self.attack is None:
            return {}
        return {"attack": self.attack.state_dict(), "attack_opt": self.attack_opt.state_dict(),
                "gen": self.gen.get_state(), "last_acc": self._last_acc}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.attack is None:
            raise CRLError(f"defense '{self.name}': load_state_dict before prepare(ctx)")
        self.attack.load_state_dict(state["attack"])
        self.attack_opt.load_state_dict(state["attack_opt"])
        self.gen.set_state(state["gen"])
        self._last_acc = state["last_acc"]
