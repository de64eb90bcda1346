"""HAMP (Chen & Pattabiraman, NDSS 2024): high-entropy soft labels, an entropy regulariser, and
test-time output modification.

Training (crl.losses.hamp): KL divergence to soft labels whose entropy is gamma * log C, minus
alpha times the prediction's entropy. When training ends, the model draws one random input
(uniform pixel levels, from the model's own seed) and records its logits; from then on every
output is those scores rearranged to the ranking of the model's own scores (the transform
`hamp_output` of crl.models.output_modification, recorded in the model's spec), so the target,
its shadow and reference models and the file `crl train` writes all answer queries that way.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch

from crl.core.errors import CRLError
from crl.core.params import Param, ParamSpec
from crl.core.registry import DEFENSES
from crl.data.types import normalize
from crl.defenses._common import LogsMeans
from crl.defenses.base import Changes, Defense, Step, TrainContext, only
from crl.losses.hamp import hamp_loss, soft_label_confidence
from crl.models.output_modification import HAMP_OUTPUT, hamp_output, set_reference_scores

OUTPUT_NOTE = ("outputs modified at query time: every answer is a random input's scores "
               "rearranged to the model's class ranking (labels unchanged)")


@DEFENSES.register("hamp")
class Hamp(LogsMeans, Defense):
    """L = KL(soft label || softmax(z)) - alpha * H(softmax(z)); outputs modified at query time.

    end_epoch() metrics: the epoch's mean KL term `l_kl` and mean prediction entropy `entropy`.
    """

    description: ClassVar[str] = ("HAMP: high-entropy soft labels, entropy regulariser, "
                                  "test-time output modification (Chen & Pattabiraman, "
                                  "NDSS 2024)")
    # Authors' settings (their alpha converted to the KL summed over classes, see the loss):
    # CIFAR-10 gamma 0.95 alpha 0.01; CIFAR-100 0.5 / 0.5; Purchase100 0.8 / 1.0;
    # Texas100 0.6 / 1.0; Location30 0.5 / 0.03.
    spec: ClassVar[ParamSpec] = ParamSpec(
        Param("gamma", 0.95, float, low=0.0, high=1.0, high_open=True,
              search=(0.3, 0.99, "linear"),
              help="soft-label entropy threshold, a fraction of the maximum entropy log C"),
        Param("alpha", 0.01, float, low=0.0, search=(0.001, 1.0, "log"),
              help="weight of the entropy regulariser (0: soft labels only)"),
        Param("modify_output", True, bool,
              help="modify outputs at query time (false: the training part only)"),
    )
    batchable: ClassVar[bool] = False   # the output transform is attached in finish()

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        super().__init__(params)
        self._confidence: float | None = None
        self._modified = False

    def prepare(self, ctxs: list[TrainContext]) -> list[Changes]:
        self._confidence = soft_label_confidence(only(self.name, ctxs).num_classes,
                                                 self.params["gamma"])
        return super().prepare(ctxs)

    def loss(self, ctxs: list[TrainContext], step: Step) -> torch.Tensor:
        if self._confidence is None:
            raise CRLError(f"defense '{self.name}' used before prepare(ctx); call prepare first")
        value, kl, entropy = hamp_loss(step.logits, step.y, self._confidence,
                                       self.params["alpha"])
        self._means().add(l_kl=kl, entropy=entropy)
        return value

    def finish(self, ctx: TrainContext) -> Changes:
        """Attach the output modification to the trained model (when modify_output)."""
        if not self.params["modify_output"]:
            return Changes()
        generator = ctx.stream("hamp", "random_input")
        pixels = torch.randint(0, 256, (1, *ctx.data.shape), generator=generator,
                               dtype=torch.uint8)
        x = normalize(pixels.to(ctx.device), ctx.data.mean, ctx.data.std)
        was_training = ctx.model.training
        ctx.model.eval()
        with torch.no_grad():
            logits = ctx.model(x)[0]
        ctx.model.train(was_training)
        model = hamp_output(ctx.model)
        set_reference_scores(model, logits)
        self._modified = True
        return Changes(model=model)

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"hamp_soft_label_confidence": self._confidence}
        if self._modified:
            out.update(model_transforms=[HAMP_OUTPUT], output_modification=OUTPUT_NOTE)
        return out
