"""Adversarial regularization (Nasr, Shokri & Houmansadr, CCS 2018): min-max training.

An inference model h(posterior, one-hot label) -> P(member) is trained (Adam) to tell members
from a reference set of non-members; the classifier minimises CE + alpha * E_members[log h],
i.e. it is pushed to make its members look like non-members to h (Nasr et al., Algorithm 1).

Reference set: the paper's defender holds a reference set of non-members. Here it is carved out
of the MEMBERS (`ref_fraction` of ctx.train_idx, stratified, from the stream "advreg"/"split"):
the model trains on fewer samples (the data cost the CRL paper points out), and the target
pool's non-members stay untouched for the audit. The inference model's initialisation and its batch
draws come from the streams "advreg"/"init" and "advreg"/"draws".
"""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from crl.core.errors import CRLError
from crl.core.params import Param, ParamSpec
from crl.core.registry import DEFENSES
from crl.defenses._common import (
    LogsMeans,
    global_rng_from,
    held_out_count,
    held_out_split,
    split_members,
)
from crl.defenses.base import Changes, Defense, Step, TrainContext, only
from crl.training.recipe import Recipe


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
class AdvReg(LogsMeans, Defense):
    """AdvReg: inside each classifier step, `k` Adam steps of the inference model, then
    loss = CE + alpha * mean log h(member batch) with h frozen.

    The inner steps run in loss(), after fit's forward pass and before the member term: the
    classifier's weights are the same at both points, so this is Nasr et al.'s order (attack
    steps, then the classifier step) without a separate hook.

    end_epoch() metrics: attack_acc (inference accuracy on the balanced member/reference batches
    it trains on, measured before each update), attack_gain (its log-likelihood gain), l_ce and
    member_log_h.
    """

    description: ClassVar[str] = ("AdvReg: adversarial regularisation against an inference "
                                  "model (Nasr et al., CCS 2018)")

    spec: ClassVar[ParamSpec] = ParamSpec(
        Param("alpha", 1.0, float, low=0.0, search=(0.1, 10.0, "log"),
              help="weight of the adversarial term (the paper's lambda)"),
        Param("k", 1, int, low=1, help="inference-model steps per classifier step"),
        Param("attack_lr", 1e-3, float, low=0.0, low_open=True,
              help="Adam learning rate of the inference model"),
        Param("ref_fraction", 0.2, float, low=0.0, high=1.0, low_open=True, high_open=True,
              help="share of the members held out as the reference set"),
    )
    batchable: ClassVar[bool] = False

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        super().__init__(params)
        self.attack: InferenceModel | None = None
        self.attack_opt: torch.optim.Optimizer | None = None
        self.ref_idx: torch.Tensor | None = None
        self.member_idx: torch.Tensor | None = None
        self.gen: torch.Generator | None = None
        self._last_acc: float | None = None

    def check(self, recipe: Recipe, n_train: int) -> None:
        held_out_count(self.name, "ref_fraction", self.params["ref_fraction"], n_train)

    def held_out(self, train_idx: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
        """The reference set, carved out of the members."""
        return held_out_split(self.name, "ref_fraction", self.params["ref_fraction"], train_idx,
                              labels, seed)[1]

    def prepare(self, ctxs: list[TrainContext]) -> list[Changes]:
        """The reference set held out of the members (the one change), the inference model."""
        ctx = only(self.name, ctxs)
        self.member_idx, self.ref_idx = split_members(ctx, self.name, "ref_fraction",
                                                      self.params["ref_fraction"])
        with global_rng_from(ctx.stream(self.name, "init")):
            self.attack = InferenceModel(ctx.num_classes)
        self.attack.to(ctx.device)
        self.attack_opt = torch.optim.Adam(self.attack.parameters(), lr=self.params["attack_lr"])
        self.gen = ctx.stream(self.name, "draws")
        super().prepare(ctxs)
        return [Changes(train_idx=self.member_idx)]

    def _ready(self) -> InferenceModel:
        if self.attack is None:
            raise CRLError(f"defense '{self.name}' used before prepare(ctx); call prepare first")
        return self.attack

    def _draw(self, pool: torch.Tensor, m: int) -> torch.Tensor:
        return pool[torch.randperm(pool.numel(), generator=self.gen)[:m]]

    def _posteriors(self, ctx: TrainContext, idx: torch.Tensor) -> torch.Tensor:
        return F.softmax(ctx.predict(idx), dim=1)

    def train_attack(self, ctx: TrainContext, batch_size: int) -> None:
        """k inner steps: ascend the inference gain on a member batch vs a reference batch.

        Both batches are drawn from the index pools and scored by ctx.predict (no augmentation,
        eval mode: what an attacker querying the released model sees), so the inference model
        cannot key on augmentation or dropout."""
        attack = self._ready()
        m = min(batch_size, self.ref_idx.numel(), ctx.train_idx.numel())
        attack.train()
        for _ in range(self.params["k"]):
            mem, ref = self._draw(ctx.train_idx, m), self._draw(self.ref_idx, m)
            y_in, y_out = (ctx.data.y[i].to(ctx.device) for i in (mem, ref))
            z_in = attack(self._posteriors(ctx, mem), y_in)
            z_out = attack(self._posteriors(ctx, ref), y_out)
            # gain = mean log h(members) + mean log(1 - h(reference)); minimise its negative
            gain = F.logsigmoid(z_in).mean() + F.logsigmoid(-z_out).mean()
            self.attack_opt.zero_grad(set_to_none=True)
            (-gain).backward()
            self.attack_opt.step()
            acc = 0.5 * (float((z_in > 0).float().mean()) + float((z_out <= 0).float().mean()))
            self._means().add(attack_acc=acc, attack_gain=gain)
            self._last_acc = acc

    def loss(self, ctxs: list[TrainContext], step: Step) -> torch.Tensor:
        logits, y = step.logits[0], step.y[0]
        self.train_attack(only(self.name, ctxs), y.shape[0])
        ce = F.cross_entropy(logits, y)
        # The inference model is frozen for the classifier step: detached parameters, so this
        # term's gradient reaches only the classifier.
        frozen = {n: p.detach() for n, p in self._ready().named_parameters()}
        z = functional_call(self.attack, frozen, (F.softmax(logits, dim=1), y))
        member_term = F.logsigmoid(z).mean()
        self._means().add(l_ce=ce, member_log_h=member_term)
        return (ce + self.params["alpha"] * member_term).reshape(1)

    def report(self) -> dict[str, Any]:
        return {
            "n_train": int(self.member_idx.numel()) if self.member_idx is not None else None,
            "n_reference": int(self.ref_idx.numel()) if self.ref_idx is not None else None,
            "final_attack_acc": self._last_acc,
            "inference_model": "Nasr et al. 2018: posterior 1024-512-64 + label 128-64 -> "
                               "256-128-64-1",
        }

    def state_dict(self) -> dict[str, Any]:
        self._ready()
        return {"attack": self.attack.state_dict(), "attack_opt": self.attack_opt.state_dict(),
                "gen": self.gen.get_state(), "last_acc": self._last_acc}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._ready().load_state_dict(state["attack"])
        self.attack_opt.load_state_dict(state["attack_opt"])
        self.gen.set_state(state["gen"])
        self._last_acc = state["last_acc"]
