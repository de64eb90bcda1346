import pytest
import torch
import torchvision
from torch import nn

from crl.errors import CRLError
from crl.models import FeatureTap, create_model
from crl.registry import MODELS


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("shape", [(1, 8, 4), (3, 32, 10)])
def test_every_model_forward_and_feature_tap(name, shape):
    channels, size, classes = shape
    if name in ("densenet121", "googlenet") and size == 32:
        size = 16  # keep the suite fast; the 32x32 path is the same code
    torch.manual_seed(0)
    model = create_model(name, channels, size, classes).eval()
    x = torch.randn(3, channels, size, size)
    with FeatureTap(model) as tap:
        logits = model(x)
        feats = tap.features
    assert logits.shape == (3, classes)
    assert feats.dim() == 2 and feats.shape[0] == 3 and feats.shape[1] == tap.in_features
    # the tapped features are exactly what the head sees: head(features) == logits
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    torch.testing.assert_close(head(feats), logits)


def test_feature_tap_keeps_gradients_and_is_removable():
    model = create_model("mlp", 1, 8, 10)
    tap = FeatureTap(model)
    model(torch.randn(4, 1, 8, 8))
    f = tap.pop()
    assert f.requires_grad
    f.pow(2).sum().backward()
    assert model[1].weight.grad is not None
    tap.remove()
    model(torch.randn(4, 1, 8, 8))
    with pytest.raises(CRLError, match="never fired"):
        tap.features


def test_feature_tap_on_unmodified_torchvision_model():
    model = torchvision.models.resnet18(weights=None, num_classes=7).eval()
    with FeatureTap(model) as tap:
        out = model(torch.randn(2, 3, 32, 32))
        assert tap.layer_name == "fc"
        assert tap.features.shape == (2, 512)
        torch.testing.assert_close(model.fc(tap.features), out)


def test_feature_tap_errors():
    model = create_model("mlp", 1, 8, 10)
    tap = FeatureTap(model)
    with pytest.raises(CRLError, match="never fired"):
        tap.features
    with pytest.raises(CRLError, match="no layer named 'nope'"):
        FeatureTap(model, layer="nope")
    with pytest.raises(CRLError, match="no nn.Linear"):
        FeatureTap(nn.Sequential(nn.Conv2d(1, 2, 3)))


def test_unknown_model_lists_valid_names():
    with pytest.raises(CRLError, match="unknown model 'vit'.*cnn.*mlp"):
        create_model("vit", 3, 32, 10)
