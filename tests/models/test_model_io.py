import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import crl
from crl.core.errors import CRLError
from crl.core.integrity import save_verified
from crl.data.types import normalize
from crl.models import ModelSpec, NormalizedModel, load_model, load_model_file, save_model
from crl.models.io import MODEL_FORMAT, released_extra

SPECS = {
    "mlp": ModelSpec("mlp", 1, 8, 10, (0.3,), (0.2,)),
    "cnn": ModelSpec("cnn", 3, 16, 10, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)),
}


def _images(spec, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, spec.in_channels, spec.image_size, spec.image_size),
                         generator=g, dtype=torch.uint8)


def _saved(tmp_path, name="mlp", **kwargs):
    torch.manual_seed(0)
    spec = SPECS[name]
    net = spec.build().eval()
    path = tmp_path / f"{name}.pt"
    save_model(path, net, spec, **kwargs)
    return path, net, spec


def _payload(model_spec, net, **changes):
    """The payload save_model writes, with some entries replaced."""
    payload = {"format": MODEL_FORMAT, "spec": model_spec.to_dict(),
               "state_dict": {k: v.detach().clone() for k, v in net.state_dict().items()},
               "extra": {}}
    payload.update(changes)
    return payload


def _refused(path, message):
    with pytest.raises(CRLError, match=f"^model file {re.escape(str(path))}:? {message}") as err:
        load_model(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_round_trip_gives_the_audit_logits(tmp_path, name):
    extra = {"epochs": 3, "metrics": {"acc": 0.5, "loss": [1.0, None]}, "ids": torch.arange(3)}
    path, net, spec = _saved(tmp_path, name, extra=extra)
    x = _images(spec)
    audit_logits = net(normalize(x, spec.mean, spec.std))

    model = load_model(path)
    assert isinstance(model, NormalizedModel) and not model.training and model.spec == spec
    torch.testing.assert_close(model(x.float() / 255), audit_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(crl.load_model(path)(x.float() / 255), audit_logits,
                               rtol=0, atol=1e-5)

    raw, spec2, extra2 = load_model_file(path)
    assert spec2 == spec and not raw.training and not isinstance(raw, NormalizedModel)
    torch.testing.assert_close(raw(normalize(x, spec.mean, spec.std)), audit_logits,
                               rtol=0, atol=1e-5)
    assert extra2["epochs"] == 3 and extra2["metrics"] == extra["metrics"]
    assert torch.equal(extra2["ids"], extra["ids"])


def test_resnet18_round_trip_keeps_batchnorm_statistics(tmp_path):
    torch.manual_seed(0)
    spec = ModelSpec("resnet18", 3, 32, 10, (0.5,) * 3, (0.25,) * 3)
    net = spec.build()
    x = _images(spec, n=4)
    net.train()(normalize(x, spec.mean, spec.std))   # moves the running statistics
    net.eval()
    path = tmp_path / "r.pt"
    save_model(path, NormalizedModel(net, spec), spec)   # a wrapped network is unwrapped
    with torch.no_grad():
        torch.testing.assert_close(load_model(path)(x.float() / 255),
                                   net(normalize(x, spec.mean, spec.std)), rtol=0, atol=1e-5)


def test_opacus_fixed_model_reloads_with_groupnorm(tmp_path):
    spec = ModelSpec("vgg11_bn", 1, 8, 10, (0.3,), (0.2,)).with_transform("opacus_fix")
    torch.manual_seed(0)
    net = spec.build().eval()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    with torch.no_grad():   # GroupNorm's affine weights away from their (1, 0) initial values
        for m in net.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    path = tmp_path / "dp.pt"
    save_model(path, net, spec)
    model = load_model(path)
    assert model.spec.transforms == ("opacus_fix",)
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = _images(spec, n=3)
    with torch.no_grad():
        torch.testing.assert_close(model(x.float() / 255),
                                   net(normalize(x, spec.mean, spec.std)), rtol=0, atol=1e-5)
    # the same weights under a header without the transform do not load (BatchNorm expected)
    plain = tmp_path / "plain.pt"
    save_verified(plain, _payload(spec, net, spec={**spec.to_dict(), "transforms": []}))
    _refused(plain, "its weights do not match its header \\(vgg11_bn, 1x8x8 images, 10 classes\\)"
                    ": the weight '1.running_mean' is missing")


def test_byte_flipped_file_fails_its_checksum(tmp_path):
    path, net, _ = _saved(tmp_path)
    raw = bytearray(path.read_bytes())
    head = net[5].weight.detach().numpy().tobytes()[:64]
    at = raw.find(head)
    assert at > 0, "the head's weights are stored as raw bytes in the file"
    raw[at + 1] ^= 0x40
    path.write_bytes(bytes(raw))
    _refused(path, "fails its checksum")


def test_header_that_disagrees_with_its_weights(tmp_path):
    _, net, spec = _saved(tmp_path)
    seven = tmp_path / "seven.pt"
    save_verified(seven, _payload(spec, net, spec={**spec.to_dict(), "num_classes": 7}))
    _refused(seven, "its weights do not match its header \\(mlp, 1x8x8 images, 7 classes\\): "
                    "'5.weight' has shape \\[10, 256\\], expected \\[7, 256\\]")
    other_arch = tmp_path / "cnn.pt"
    save_verified(other_arch, _payload(spec, net, spec={**spec.to_dict(), "arch": "cnn"}))
    _refused(other_arch, "its weights do not match its header \\(cnn, 1x8x8 images, 10 classes\\)")


@pytest.mark.parametrize("changes, message", [
    ({"state_dict": None}, "has no state_dict"),
    ({"state_dict": [1, 2]}, "state_dict is a list; expected a dict of tensors"),
    ({"state_dict": {"5.weight": 1.0}}, "state_dict\\['5.weight'\\] is a float; expected a tensor"),
    ({"spec": None}, "spec = None: expected a mapping"),
    ({"extra": [1]}, "extra = list: expected a dict"),
    ({"format": "crl-model-1"},
     "is not a crl model \\(format 'crl-model-1'; expected crl-model-2\\)"),
])
def test_broken_payloads_are_refused(tmp_path, changes, message):
    _, net, spec = _saved(tmp_path)
    path = tmp_path / "broken.pt"
    save_verified(path, _payload(spec, net, **changes))
    _refused(path, message)


@pytest.mark.parametrize("field, value, message", [
    ("in_channels", "1", "in_channels = '1': expected an integer >= 1"),
    ("transforms", ["opacus_fix", "quantize"],
     ("transforms = \\['opacus_fix', 'quantize'\\]: expected a list of values, each one of: "
      "hamp_output, opacus_fix")),
    ("arch", "vit", "arch = 'vit': expected one of: "),
])
def test_bad_header_fields_are_refused(tmp_path, field, value, message):
    _, net, spec = _saved(tmp_path)
    path = tmp_path / "header.pt"
    save_verified(path, _payload(spec, net, spec={**spec.to_dict(), field: value}))
    _refused(path, message)


def test_foreign_and_hostile_files_are_refused(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": MODEL_FORMAT, "x": Evil()}, evil)
    _refused(evil, "is unreadable")
    assert "pwned" not in capsys.readouterr().out
    old = tmp_path / "old.pt"   # the unchecked format before crl-model-2
    torch.save({"format": "crl-model-1", "state_dict": {}}, old)
    _refused(old, "is not a checksummed crl file")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    _refused(junk, "is unreadable")
    _refused(tmp_path / "missing.pt", "does not exist")


def test_save_refuses_what_it_could_not_load_back(tmp_path):
    spec = SPECS["mlp"]
    path = tmp_path / "m.pt"
    where = f"^cannot save model file {re.escape(str(path))}: "
    with pytest.raises(CRLError, match=where + "the network does not fit its spec \\(mlp, 1x8x8 "
                                       "images, 10 classes\\): '5.weight' has shape \\[7, 256\\]"):
        save_model(path, ModelSpec("mlp", 1, 8, 7, (0.3,), (0.2,)).build(), spec)
    with pytest.raises(CRLError, match=where + "extra\\['acc'\\] = np.float32\\(0.5\\) is a "
                                       "float32: expected str, int"):
        save_model(path, spec.build(), spec, extra={"acc": np.float32(0.5)})
    with pytest.raises(CRLError, match=where + "spec is a dict; expected a ModelSpec"):
        save_model(path, spec.build(), spec.to_dict())
    other = ModelSpec("mlp", 1, 8, 10, (0.5,), (0.2,))
    with pytest.raises(CRLError, match=where + "the model's spec .* is not the spec given"):
        save_model(path, NormalizedModel(other.build(), other), spec)
    assert list(tmp_path.iterdir()) == []   # nothing written, not even a temporary file


def _released(tmp_path, names=None):
    """An mlp model file as crl train / the audit release it (class names, expected input)."""
    torch.manual_seed(0)
    spec = SPECS["mlp"]
    net = spec.build().eval()
    path = tmp_path / "released.pt"
    save_model(path, net, spec, extra=released_extra(spec, names, history=[{"epoch": 1}]))
    return path, net, spec


def test_released_file_stores_class_names_and_input_never_indices(tmp_path):
    names = [f"digit {i}" for i in range(10)]
    path, _, _ = _released(tmp_path, names)
    _, _, extra = load_model_file(path)
    assert extra["class_names"] == names and extra["history"] == [{"epoch": 1}]
    assert extra["input"] == {"layout": "NCHW", "channels": 1, "height": 8, "width": 8,
                              "value_range": [0.0, 1.0]}
    assert load_model(path).class_names == tuple(names)
    (tmp_path / "n").mkdir()
    no_names, _, _ = _released(tmp_path / "n", None)
    assert load_model(no_names).class_names == tuple(str(i) for i in range(10))
    with pytest.raises(CRLError, match="must not carry dataset indices \\(trained_on\\)"):
        released_extra(SPECS["mlp"], names, trained_on=[1, 2])


def test_input_outside_0_1_warns_once(tmp_path):
    path, _, spec = _released(tmp_path)
    model = load_model(path)
    x = _images(spec).float()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x / 255)                  # [0, 1]: silent
    with pytest.warns(UserWarning, match=r"values in \[\d+, \d+\]: expected images in \[0, 1\]"):
        model(x)                        # raw 0-255 values
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)                        # once per model
    digits16 = (x[:, 0] / 16).floor().numpy()      # raw sklearn digits: floats in 0-16
    with pytest.warns(UserWarning, match=r"values in \[0, 1[0-6]\]"):
        load_model(path).predict(digits16)
    raw, _, _ = load_model_file(path)   # the raw network is not the place for the check
    assert not isinstance(raw, NormalizedModel)


def test_predict_converts_pil_numpy_and_tensors(tmp_path):
    from PIL import Image

    names = [f"n{i}" for i in range(10)]
    path, net, spec = _released(tmp_path, names)
    model = load_model(path)
    x = _images(spec, n=5)                                     # uint8 [5, 1, 8, 8]
    with torch.no_grad():
        expected = net(normalize(x, spec.mean, spec.std)).argmax(1).numpy()
    hwc = x.permute(0, 2, 3, 1).numpy()                        # NHWC uint8
    for images in (hwc, hwc[..., 0], list(hwc), x, x.float() / 255, hwc.astype(np.float32) / 255,
                   [Image.fromarray(a[..., 0], "L") for a in hwc],
                   [Image.fromarray(np.repeat(a, 3, axis=2), "RGB") for a in hwc]):
        out = model.predict(images)
        np.testing.assert_array_equal(out.labels, expected)
        assert out.names == [names[i] for i in expected] and out.probs.shape == (5, 10)
        np.testing.assert_allclose(out.probs.sum(1), 1, rtol=1e-5)
    single = model.predict(hwc[0])                             # one HWC image
    assert single.labels.tolist() == [expected[0]]
    big = np.kron(hwc[0][..., 0], np.ones((4, 4), np.uint8))                  # 32x32 grey
    small = torch.nn.functional.interpolate(torch.from_numpy(big)[None, None].float() / 255,
                                            size=(8, 8), mode="bilinear", antialias=True)
    with torch.no_grad():
        np.testing.assert_allclose(model.predict(Image.fromarray(big, "L")).probs,
                                   torch.softmax(model(small), 1).numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("images, message", [
    (np.zeros((2, 3, 8, 8), np.uint8), "array of shape \\[2, 3, 8, 8\\]: expected HW, HWC or NHWC"),
    (torch.zeros(8, 8), "tensor of shape \\[8, 8\\]: expected CHW or NCHW"),
    ("cat.png", "images = str: expected a PIL image"),
    ([], "images = \\[\\]: expected at least one image"),
    (np.zeros((1, 8, 8, 2), np.uint8), "array of shape \\[1, 8, 8, 2\\]"),
    (np.zeros((8, 8, 3), bool), "dtype torch.bool: expected uint8 or float"),
])
def test_predict_refuses_what_it_cannot_convert(tmp_path, images, message):
    model = load_model(_released(tmp_path)[0])
    with pytest.raises(CRLError, match=message):
        model.predict(images)


def test_files_written_before_class_names_still_load(tmp_path):
    """A model.pt of the previous layout (training indices in extra, no class names) loads and
    predicts labels without names; a stored class list that does not fit is refused."""
    _, net, spec = _saved(tmp_path)
    old = tmp_path / "old.pt"
    save_verified(old, _payload(spec, net, extra={"trained_on": [0, 1, 2], "report": {},
                                                  "history": [], "groups": {}}))
    model = load_model(old)
    assert model.class_names is None
    out = model.predict(_images(spec, n=3))
    assert out.names is None and out.labels.shape == (3,)
    bad = tmp_path / "bad.pt"
    save_verified(bad, _payload(spec, net, extra={"class_names": ["a", "b"]}))
    _refused(bad, "class_names = \\['a', 'b'\\]: expected a list of 10 strings")
    wrong_input = tmp_path / "wrong_input.pt"
    save_verified(wrong_input, _payload(spec, net, extra={
        "class_names": list("abcdefghij"), "input": {**spec.input_description(), "width": 9}}))
    _refused(wrong_input, "input = .* disagrees with its spec")
