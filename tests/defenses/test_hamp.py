"""HAMP (Chen & Pattabiraman, NDSS 2024): its loss against a plain-torch recomputation, and its
test-time output modification wherever the released model is queried (the audit's target,
reference and shadow models, the file `crl train` writes)."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import crl
import crl.defenses  # (registers every defense)
from crl.cli import main
from crl.defenses.base import Step, build_defense
from crl.engine.fit import fit
from crl.losses.hamp import soft_label_confidence
from crl.models.io import load_model_file
from crl.models.output_modification import (
    BUFFER,
    HAMP_OUTPUT,
    hamp_output,
    rearrange_like,
    set_reference_scores,
)
from crl.models.zoo import create_model
from crl.training.recipe import Recipe


def _plain_loss(logits, y, gamma, alpha):
    """The paper's loss from its definition, in float64: the soft label (p on the true class,
    the rest evenly) whose entropy is gamma * log C, KL summed over classes, minus alpha times
    the prediction's entropy, averaged over the batch."""
    c = logits.shape[1]
    p = soft_label_confidence(c, gamma)
    soft = torch.full((len(y), c), (1 - p) / (c - 1), dtype=torch.float64)
    soft[torch.arange(len(y)), y] = p
    q = torch.softmax(logits.double(), 1)
    kl = (soft * (soft.log() - q.log())).sum(1)
    entropy = -(q * q.log()).sum(1)
    return (kl - alpha * entropy).mean()


@pytest.mark.parametrize("classes, gamma", [(10, 0.95), (10, 0.5), (100, 0.5), (2, 0.3)])
def test_soft_label_entropy_meets_the_threshold(classes, gamma):
    """p is the largest confidence whose label entropy reaches gamma * log C."""
    p = soft_label_confidence(classes, gamma)

    def entropy(p):
        rest = (1 - p) / (classes - 1)
        return -(p * math.log(p) + (classes - 1) * rest * math.log(rest))

    target = gamma * math.log(classes)
    assert 1 / classes <= p < 1
    assert entropy(p) >= target - 1e-12 and entropy(p + 1e-9) < target
    # the authors' code lowers p from 1 in steps of 0.01 until the threshold is met
    stepped = 1.0
    while entropy(min(stepped, 1 - 1e-15)) < target:
        stepped -= 0.01
    assert stepped <= p + 1e-9 and p - stepped < 0.01 + 1e-9


@pytest.mark.parametrize("gamma, alpha", [(0.95, 0.01), (0.5, 0.5), (0.8, 0.0)])
def test_loss_matches_a_plain_torch_recomputation(gamma, alpha):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 10, generator=g) * 3
    y = torch.randint(0, 10, (16,), generator=g)
    defense = build_defense("hamp", {"gamma": gamma, "alpha": alpha})
    ctxs = [SimpleNamespace(num_classes=10)]
    defense.prepare(ctxs)
    step = Step(x=torch.zeros(1, 16, 1), y=y[None], idx=torch.arange(16)[None],
                logits=logits[None], features=None, epoch=1, step=1)
    got = defense.loss(ctxs, step)
    assert got.shape == (1,)
    assert float(got[0]) == pytest.approx(float(_plain_loss(logits, y, gamma, alpha)), rel=1e-5)
    (end,) = defense.end_epoch(ctxs, 1)
    assert set(end.metrics) == {"l_kl", "entropy"}


def test_output_modification_keeps_every_predicted_label():
    g = torch.Generator().manual_seed(1)
    out = torch.randn(500, 10, generator=g)
    out[:50, 3] = out[:50, 7] = out[:50].max(1).values + 1   # ties at the top: argmax is 3
    out[50:60] = 0.0                                         # all tied: argmax is 0
    net = hamp_output(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 10)))
    set_reference_scores(net, torch.tensor([0.1, 0.1, 0.1, -2, 5, 0, 0, 0, 3, 1.0]))
    scores = getattr(net, BUFFER)
    assert bool((scores[1:] < scores[:-1]).all())            # ties in the random input broken
    new = rearrange_like(scores, out)
    assert torch.equal(new.argmax(1), out.argmax(1))
    assert torch.equal(new.sort(1, descending=True).values, scores.expand(500, 10))
    free = slice(60, None)                                   # rows without ties keep their ranking
    assert torch.equal(new[free].argsort(1), out[free].argsort(1))
    x = torch.randn(200, 4, generator=g)
    with torch.no_grad():
        assert torch.equal(net(x).argmax(1), net.forward(x).argmax(1))


def _rows_are_permutations(model, x):
    with torch.no_grad():
        modified, raw = model(x), model.forward(x)
    scores = getattr(model, BUFFER)
    assert torch.equal(modified.sort(1, descending=True).values, scores.expand_as(modified))
    assert torch.equal(modified.argmax(1), raw.argmax(1))
    assert not torch.allclose(modified, raw)


def test_fit_attaches_the_modification_and_gradients_pass_through(digits):
    torch.manual_seed(0)
    idx = np.arange(300)
    recipe = Recipe(epochs=2, batch_size=32, lr=0.05, seed=0, device="cpu")
    res = fit(create_model("mlp", 1, 8, 10), digits, idx, recipe, build_defense("hamp"),
              progress=False)
    assert res.report["model_transforms"] == [HAMP_OUTPUT]
    x = (digits.x[:64].float() / 255 - digits.mean[0]) / digits.std[0]
    _rows_are_permutations(res.model, x)
    # gradients pass straight through: d(v . output)/dx is the trained network's
    v = torch.randn(64, 10, generator=torch.Generator().manual_seed(2))
    grads = []
    for call in (res.model, res.model.forward):
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad((call(xg) * v).sum(), xg)
        grads.append(g)
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1])
    off = fit(create_model("mlp", 1, 8, 10), digits, idx, recipe,
              build_defense("hamp", {"modify_output": False}), progress=False)
    assert "model_transforms" not in off.report and not hasattr(off.model, BUFFER)


def test_audit_queries_modified_target_reference_and_shadow_models(tmp_path, capsys, digits,
                                                                    monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CRL_CACHE", str(cache))
    out = tmp_path / "run"
    code = main(["audit", "--epochs", "5", "--subset", "200", "--seeds", "0", "--quiet",
                 "--shadows", "1", "--references", "4", "--defenses", "hamp",
                 "--attacks", "loss,lira", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    row = json.loads((out / "results.json").read_text())[0]
    assert "modified at query time" in row["defense_report"]["output_modification"]
    assert "modified at query time" in (out / "report.md").read_text()
    # the target: the audit's stored loss scores are those of the modified outputs
    folder = out / "models" / "hamp" / "seed0"
    model = crl.load_model(folder / "model.pt")
    assert model.spec.transforms == (HAMP_OUTPUT,)
    from crl.audit.outcome import load_outcome

    saved = load_outcome(out / "scores" / "hamp_seed0.npz")
    idx = torch.as_tensor(saved.evaluation.sample_idx)
    with torch.no_grad():
        logits = model(digits.x[idx].float() / 255)
        raw = model.net.forward(model.normalize(digits.x[idx].float() / 255))
    mine = torch.log_softmax(logits.double(), 1)[torch.arange(len(idx)), digits.y[idx]]
    np.testing.assert_allclose(saved.attacks["loss"].scores, mine.numpy(), rtol=1e-5, atol=1e-6)
    assert torch.equal(logits.argmax(1), raw.argmax(1)) and not torch.allclose(logits, raw)
    # every model the audit trained (target, 4 references, 1 shadow) answers modified
    files = sorted((cache / "models").glob("*.pt"))
    assert len(files) == 6
    x = (digits.x[:64].float() / 255 - digits.mean[0]) / digits.std[0]
    for path in files:
        net, spec, extra = load_model_file(path)
        assert spec.transforms == (HAMP_OUTPUT,) and extra["key"]["defense"] == "hamp"
        _rows_are_permutations(net, x)


def test_crl_train_file_reloads_with_the_modification(tmp_path, capsys, digits):
    out = tmp_path / "model"
    assert main(["train", "--epochs", "2", "--quiet", "--defense", "hamp",
                 "--out", str(out)]) == 0
    model = crl.load_model(out / "model.pt")
    assert model.spec.transforms == (HAMP_OUTPUT,)
    _rows_are_permutations(model.net, (digits.x[:64].float() / 255 - digits.mean[0])
                           / digits.std[0])
    split = json.loads((out / "split.json").read_text())
    idx = torch.as_tensor(split["test"])
    with torch.no_grad():
        acc = float((model(digits.x[idx].float() / 255).argmax(1) == digits.y[idx])
                    .float().mean())
    assert acc == pytest.approx(json.loads((out / "result.json").read_text())["test_acc"])
