"""Probe failures of issue 18 (defect 9): resource bounds checked before allocating, one-line
errors where tracebacks were, words that name the cause, and Ray's token authentication."""
import io
import os
import random
import tarfile
import time
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import crl
from crl.cli import main
from crl.core.errors import CRLError
from crl.data.datasets import load_dataset
from crl.data.limits import available_memory, check_reference_scores, memory_budget


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


# --------------------------------------------------------------------------- resource bounds

def test_memory_budget_defaults_to_half_the_available_memory(monkeypatch):
    monkeypatch.delenv("CRL_MEMORY_BUDGET", raising=False)
    monkeypatch.setattr("crl.data.limits.available_memory", lambda: 3000)
    assert memory_budget() == 1500
    monkeypatch.setenv("CRL_MEMORY_BUDGET", "3G")
    assert memory_budget() == 3 * 2**30
    monkeypatch.setenv("CRL_MEMORY_BUDGET", "half")
    with pytest.raises(CRLError, match="CRL_MEMORY_BUDGET = 'half': expected a number of bytes"):
        memory_budget()
    assert available_memory() is None or available_memory() > 0


def test_canaries_over_the_budget_are_refused_before_their_images_exist(digits, monkeypatch):
    from crl.data.canaries import make_canaries

    monkeypatch.setenv("CRL_MEMORY_BUDGET", "1M")   # 10000 noise images of 1x8x8 and a copy
    with pytest.raises(CRLError, match=r"^canaries = 10000:noise: 10000 images of 1x8x8 would "
                                       r"take about .* MiB; expected at most 1.0 MiB \(the "
                                       r"memory budget: CRL_MEMORY_BUDGET\)") as err:
        make_canaries(digits, 10000, "noise", np.zeros(0, np.int64))
    _one_line(err)
    assert make_canaries(digits, 100, "noise", np.zeros(0, np.int64)).n == 100


def test_a_huge_reference_count_is_refused_before_planning(tmp_path, monkeypatch):
    from crl.audit.pipeline import prepare
    from crl.config import AuditConfig

    monkeypatch.setenv("CRL_MEMORY_BUDGET", "64M")
    cfg = AuditConfig(defenses=["ce"], attacks=["lira"], references=20000, seeds=[0],
                      out=str(tmp_path / "run"))
    with pytest.raises(CRLError, match=r"^references = 20000: the reference models' logits on "
                                       r"1797 samples of 10 classes would take about") as err:
        prepare(cfg)
    _one_line(err)
    assert not (tmp_path / "run").exists()
    check_reference_scores(64, 1797, 10)   # the default fits


def _padded_png(seed: int, size: int) -> bytes:
    """A small PNG followed by zeros up to `size` bytes (PIL stops reading at IEND)."""
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue().ljust(size, b"\0")


def test_archive_members_are_decoded_one_at_a_time(tmp_path):
    """16 members of 2 MiB (a 0.1 MB archive): decoding never holds them all (32 MiB)."""
    arc = tmp_path / "big.tar.gz"
    member = 2 * 2**20
    with tarfile.open(arc, "w:gz") as tf:
        names = [f"{split}/{cls}/{i}.png" for split in ("train", "test") for cls in "ab"
                 for i in range(4)]
        for i, name in enumerate(names):
            blob = _padded_png(i, member)
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    tracemalloc.start()
    try:
        data = load_dataset(f"imagefolder:{arc}")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert data.x.shape == (16, 3, 5, 6)
    # streamed: a few members' worth at once (8 MiB measured), however many there are
    assert peak < 8 * member, f"peak {peak / 2**20:.1f} MiB while reading 16 x 2 MiB members"


def test_a_model_header_is_checked_before_its_network_is_built(tmp_path, monkeypatch):
    from crl.core.integrity import save_verified
    from crl.models import ModelSpec, load_model, save_model
    from crl.models.io import MODEL_FORMAT

    small = ModelSpec("mlp", 1, 8, 10, (0.3,), (0.2,))
    torch.manual_seed(0)
    net = small.build()
    lying = ModelSpec("mlp", 3, 96, 10, (0.3,) * 3, (0.2,) * 3).to_dict()  # tiny weights
    path = tmp_path / "lying.pt"
    save_verified(path, {"format": MODEL_FORMAT, "spec": lying, "extra": {},
                         "state_dict": {k: v.clone() for k, v in net.state_dict().items()}})
    built_on = []
    real_build = ModelSpec.build

    def recording_build(self):
        built_on.append(torch.empty(0).device.type)
        return real_build(self)

    monkeypatch.setattr(ModelSpec, "build", recording_build)
    with pytest.raises(CRLError, match="its weights do not match its header") as err:
        load_model(path)
    _one_line(err)
    assert built_on and set(built_on) == {"meta"}   # shapes only, nothing allocated
    good = tmp_path / "good.pt"
    save_model(good, net, small)
    monkeypatch.setenv("CRL_MEMORY_BUDGET", "1K")
    with pytest.raises(CRLError, match=r"the network of its header \(mlp, 1x8x8 images, 10 "
                                       r"classes\) would take about .* KiB; expected at most "
                                       r"1.0 KiB \(the memory budget"):
        load_model(good)


# --------------------------------------------------------------------------- tracebacks

@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
@pytest.mark.parametrize("command", ["train", "audit"])
def test_out_under_proc_is_refused_even_for_root(command, tmp_path, monkeypatch, capsys):
    from crl.rundir import check_out_dir

    monkeypatch.setattr(os, "access", lambda *a, **k: True)   # what root is told
    with pytest.raises(CRLError, match=r"^--out /proc/crl-x: /proc is not writable"):
        check_out_dir("/proc/crl-x")
    assert main([command, "--epochs", "1", "--out", "/proc/crl-x/run", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("crl: error: --out /proc/crl-x/run: /proc is not writable")
    assert err.count("\n") == 1
    assert check_out_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    assert os.listdir(tmp_path) == []    # the write test leaves nothing behind


def _corrupt_studies(tmp_path):
    from crl.tune.study import open_study

    good = tmp_path / "good"
    good.mkdir()
    open_study(good, {"defense": "crl"}, 0)
    raw = (good / "study.db").read_bytes()
    rng = random.Random(0)
    yield "random", bytes(rng.randrange(256) for _ in range(4096))
    yield "truncated", raw[: len(raw) // 3]
    yield "zeroed header", b"\0" * 100 + raw[100:]
    yield "directory", None


def test_a_corrupt_study_file_is_a_one_line_error(tmp_path):
    from crl.tune.study import STUDY_FILE, open_study

    for kind, content in _corrupt_studies(tmp_path):
        out = tmp_path / kind.replace(" ", "-")
        out.mkdir()
        if content is None:
            (out / STUDY_FILE).mkdir()
        else:
            (out / STUDY_FILE).write_bytes(content)
        with pytest.raises(CRLError, match=rf"^study file {out / STUDY_FILE} is (unreadable|not "
                                           r"a file).*; expected the SQLite study") as err:
            open_study(out, {"defense": "crl"}, 0)
        _one_line(err)
        if content is not None:       # nothing changed on disk
            assert (out / STUDY_FILE).read_bytes() == content


class _TupleNet(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        z = self.fc(x.flatten(1))
        return z, x.flatten(1)


def test_audit_training_with_a_tuple_returning_model_is_a_one_line_error(digits):
    x, y = digits.x.float()[:200] / 255, digits.y[:200]
    with pytest.raises(CRLError, match=r"model\(x\) of _TupleNet returned a tuple: expected a "
                                       r"tensor of logits \[samples, 10\]") as err:
        crl.audit_training(lambda xt, yt, seed: _TupleNet(seed), x, y, attacks=("loss",),
                           shadows=1, progress=False, bootstrap=50)
    _one_line(err)


class _Detached(nn.Module):
    def __init__(self, no_grad: bool) -> None:
        super().__init__()
        self.fc, self.no_grad = nn.Linear(64, 10), no_grad

    def forward(self, x):
        if self.no_grad:
            with torch.no_grad():
                return self.fc(x.flatten(1))
        return self.fc(x.detach().flatten(1))


@pytest.mark.parametrize("no_grad", [False, True])
def test_gradx_on_a_model_without_input_gradients_is_a_one_line_error(digits, no_grad):
    from crl.models.gradients import input_gradient_norms

    with pytest.raises(CRLError, match=r"attack 'gradx': the loss of _Detached has no gradient "
                                       r"with respect to its input") as err:
        input_gradient_norms(_Detached(no_grad), digits, np.arange(8))
    _one_line(err)
    with pytest.raises(CRLError, match=r"attack 'gradx': model\(x\) of _TupleNet returned a "
                                       r"tuple"):
        input_gradient_norms(_TupleNet(0), digits, np.arange(8))


# --------------------------------------------------------------------------- words

@pytest.mark.parametrize("content, why", [(b"", "the file is empty"),
                                          (bytes(range(256)) * 12, "it is not a tar archive")])
@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_a_non_tar_or_empty_archive_is_one_line(tmp_path, content, why, suffix, capsys):
    arc = tmp_path / f"data{suffix}"
    arc.write_bytes(content)
    with pytest.raises(CRLError, match=rf"^cannot read archive {arc}: {why}.*; expected a tar "
                                       "archive") as err:
        load_dataset(f"imagefolder:{arc}")
    _one_line(err)
    assert main(["audit", "--dataset", f"imagefolder:{arc}", "--out", str(tmp_path / "o"),
                 "--quiet"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_diverged_run_names_the_model_epoch_and_the_fix(tmp_path, capsys):
    """One full-batch step at lr 1e30: the loss it saw was finite, the weights it left are not
    usable (the attacks would see only 'N logits are NaN or infinite')."""
    args = ["--epochs", "1", "--lr", "1e30", "--batch-size", "4096", "--quiet"]
    assert main(["audit", "--defenses", "ce", "--attacks", "loss", "--shadows", "1", "--seeds",
                 "0", *args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("crl: error: training diverged of model [ce seed 0] target: ")
    assert "are NaN or infinite after epoch 1 (defense 'ce')" in err and "lower --lr" in err
    assert main(["train", "--defense", "ce", *args, "--out", str(tmp_path / "train")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("crl: error: training diverged") and "lower --lr" in err
    assert not (tmp_path / "train" / "model.pt").exists()


def test_stale_temporary_cache_entries_are_removed_when_the_cache_opens(tmp_path):
    from crl.audit.factory import ModelCache

    root = tmp_path / "models"
    root.mkdir()
    stale, fresh = root / ".abc.pt.x1.tmp", root / ".def.pt.x2.tmp"
    for p in (stale, fresh):
        p.write_bytes(b"half")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    ModelCache(root)
    assert not stale.exists() and fresh.exists()   # a fresh one may be a write in flight


# --------------------------------------------------------------------------- Ray

def _flooding_init(message: str):
    def init(*args, **kwargs):
        for _ in range(20):
            os.write(2, b"[2026-12-03 W gcs_client.cc:210: Failed to get cluster ID from GCS "
                        + message.encode() + b"\n")
        raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379")
    return init


def test_a_ray_cluster_refusing_the_token_is_named_and_its_logs_stay_off(monkeypatch, capfd):
    ray = pytest.importorskip("ray")
    from crl.engine.ray_engine import RayEngine

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", _flooding_init(
        "server: Unauthenticated: RPC error: InvalidAuthToken: Authentication token is missing "
        "or incorrect"))
    with pytest.raises(CRLError, match=r"^ray.address = '10.0.0.1:6379': the Ray cluster "
                                       r"refused this process's authentication token .* "
                                       r"expected RAY_AUTH_MODE=token") as err:
        RayEngine(address="10.0.0.1:6379")
    _one_line(err)
    assert "gcs_client" not in capfd.readouterr().err
    monkeypatch.setattr(ray, "init", _flooding_init("server: Connection refused"))
    with pytest.raises(CRLError, match="expected the address of a running Ray head"):
        RayEngine(address="10.0.0.1:6379")
    assert "gcs_client" not in capfd.readouterr().err
