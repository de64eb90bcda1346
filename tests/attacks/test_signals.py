import numpy as np
import pytest

from crl.attacks.signals import Signals
from crl.core.errors import CRLError


def _sig(models=2, n=5, c=3, order=None, seed=0):
    rng = np.random.default_rng(seed)
    idx = np.arange(10, 10 + n) if order is None else np.asarray(order)
    return Signals(rng.normal(size=(models, n, c)), rng.random((models, n)) < 0.5,
                   idx % c, idx)


def test_merge_stacks_models():
    a, b = _sig(2, seed=0), _sig(3, seed=1)
    m = Signals.merge([a, b])
    assert m.num_models == 5
    np.testing.assert_array_equal(m.logits[2:], b.logits)
    np.testing.assert_array_equal(m.member[:2], a.member)


def test_merge_refuses_another_data_order():
    a = _sig(order=[10, 11, 12, 13, 14])
    b = _sig(order=[11, 10, 12, 13, 14])
    with pytest.raises(CRLError, match="another sample order"):
        Signals.merge([a, b])


@pytest.mark.parametrize("kwargs,msg", [
    (dict(logits=np.zeros((2, 5)), member=np.zeros((2, 5))),
     "must be \\[models, samples, classes\\], got \\[2, 5\\]"),
    (dict(logits=np.zeros((2, 5, 3)), member=np.zeros((3, 5))),
     "membership matrix must be \\[2, 5\\]"),
    (dict(logits=np.zeros((2, 5, 3)), member=np.zeros((2, 5)), labels=np.zeros(4, int)),
     "must have 5 entries"),
    (dict(logits=np.zeros((2, 5, 3)), member=np.zeros((2, 5)), labels=np.full(5, 3)),
     "labels must lie in \\[0, 3\\)"),
    (dict(logits=np.zeros((2, 5, 3)), member=np.zeros((2, 5)), logits_flip=np.zeros((2, 5, 2))),
     "flipped logits \\[2, 5, 2\\] differ from logits \\[2, 5, 3\\]"),
])
def test_mismatched_shapes_are_clear_errors(kwargs, msg):
    args = dict(labels=np.zeros(5, int), sample_idx=np.arange(5))
    args.update(kwargs)
    with pytest.raises(CRLError, match=msg):
        Signals(**args)
