"""crl.models.query: the oracle answers batches, counts queries, and hides what label-only hides."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crl.core.errors import CRLError
from crl.models.query import QueryAccess, QueryOracle

MEAN, STD = (0.3,), (0.2,)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Dropout(0.5), nn.Linear(8, 3))


def images(n=10):
    return torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(1))


def test_logits_equal_plain_forward_on_normalised_inputs_in_eval_mode():
    net = model().train()
    x = images()
    out = QueryOracle(net, MEAN, STD, batch_size=3).logits(x)
    assert net.training   # mode restored
    net.eval()
    with torch.no_grad():
        expected = net((x - 0.3) / 0.2)
    torch.testing.assert_close(out, expected)


def test_labels_and_budget():
    net, x = model(), images()
    oracle = QueryOracle(net, MEAN, STD, label_only=True, budget=15, batch_size=4)
    with torch.no_grad():
        expected = net.eval()((x - 0.3) / 0.2).argmax(1).numpy()
    np.testing.assert_array_equal(oracle.labels(x), expected)
    assert oracle.queries == 10
    with pytest.raises(CRLError, match=r"query budget = 15: exceeded \(10 used, 10 more"):
        oracle.labels(x)
    assert oracle.queries == 10   # a refused query costs nothing and runs nothing
    oracle.labels(x[:5])
    assert oracle.queries == 15


def test_label_only_refuses_logits_and_gradients():
    oracle = QueryOracle(model(), MEAN, STD, label_only=True)
    with pytest.raises(CRLError, match="label-only: logits"):
        oracle.logits(images())
    with pytest.raises(CRLError, match="label-only: input gradients"):
        oracle.input_gradients(images(), [0] * 10)
    assert oracle.queries == 0


def test_input_gradients_match_plain_autograd():
    net, x, y = model(), images(), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    g = QueryOracle(net, MEAN, STD, batch_size=4).input_gradients(x, y)
    xr = x.clone().requires_grad_(True)
    net.eval()
    loss = F.cross_entropy(net((xr - 0.3) / 0.2), y, reduction="sum")
    (expected,) = torch.autograd.grad(loss, xr)
    torch.testing.assert_close(g, expected)


@pytest.mark.parametrize("bad", [torch.rand(2, 16), torch.rand(2, 3, 4, 4),
                                 torch.full((2, 1, 4, 4), 1.5),
                                 torch.full((2, 1, 4, 4), float("nan")),
                                 torch.zeros(2, 1, 4, 4, dtype=torch.uint8)])
def test_bad_inputs_are_one_line_errors(bad):
    with pytest.raises(CRLError, match="query inputs"):
        QueryOracle(model(), MEAN, STD).labels(bad)


def test_access_gives_fresh_label_only_oracles():
    access = QueryAccess((images() * 255).to(torch.uint8), [model()], MEAN, STD)
    assert access.inputs([0, 2]).shape == (2, 1, 4, 4)
    assert access.inputs().max() <= 1.0
    o = access.oracle(0)
    assert o.label_only and o.queries == 0
    assert not access.oracle(0, label_only=False).label_only
    with pytest.raises(CRLError, match="model = 1"):
        access.oracle(1)
    with pytest.raises(CRLError, match="query budget = -1"):
        QueryOracle(model(), MEAN, STD, budget=-1)
