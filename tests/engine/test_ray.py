"""The Ray engine (crl.engine.ray_engine) on a local Ray with 2 CPUs: an audit on Ray gives the
sequential engine's rows, a warm cache trains nothing on Ray, a task whose worker dies is
retried and still returns the sequential engine's models. Needs the ray extra
(pip install 'crl[ray]'); without it the Ray tests skip, the missing-ray message is still tested."""
import json
import logging
import os
import shutil
import sys
import tempfile

import numpy as np
import pytest
import torch

from crl.cli import main
from crl.core.errors import CRLError
from crl.engine import TrainRequest, get_engine
from crl.models.spec import ModelSpec
from crl.training.recipe import Recipe

TINY = ["--epochs", "2", "--subset", "200", "--seeds", "0", "--quiet", "--shadows", "0",
        "--attacks", "loss,lira", "--references", "4", "--defenses", "ce"]


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray (2 CPUs) for the module; the engine uses it as it is. Its session files
    go to a short folder under /tmp (Ray's socket paths must stay short)."""
    ray = pytest.importorskip("ray", reason="the Ray engine needs the ray extra: "
                                            "pip install 'crl[ray]'")
    folder = tempfile.mkdtemp(prefix="crl-ray-test-")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, _temp_dir=folder)
    yield ray
    ray.shutdown()
    shutil.rmtree(folder, ignore_errors=True)


def _rows(out) -> list[dict]:
    return json.loads((out / "results.json").read_text())


def _timeless(rows: list[dict]) -> list[dict]:
    """The rows without each attack's wall time."""
    return [{**r, "attacks": {name: {k: v for k, v in a.items() if k != "seconds"}
                              for name, a in r["attacks"].items()}} for r in rows]


def test_ray_audit_rows_equal_sequential_and_a_warm_rerun_trains_nothing(local_ray, tmp_path,
                                                                         monkeypatch, capsys):
    from crl.engine.ray_engine import RayEngine

    trained: list[int] = []
    real_train = RayEngine.train

    def counting_train(self, spec, data, recipe, defense, params, requests, **kw):
        trained.append(len(requests))
        return real_train(self, spec, data, recipe, defense, params, requests, **kw)

    monkeypatch.setattr(RayEngine, "train", counting_train)
    assert main(["audit", *TINY, "--engine", "sequential", "--no-cache",
                 "--out", str(tmp_path / "seq")]) == 0, capsys.readouterr().err
    assert main(["audit", *TINY, "--engine", "ray", "--out", str(tmp_path / "ray")]) == 0, \
        capsys.readouterr().err
    assert trained == [5]                       # the target and 4 references, all on Ray
    seq, ray = _rows(tmp_path / "seq"), _rows(tmp_path / "ray")
    assert len(seq) == len(ray) == 1
    for name in ("loss", "lira"):
        assert ray[0]["attacks"][name]["auc"] == pytest.approx(
            seq[0]["attacks"][name]["auc"], abs=0.01), name
    assert ray[0]["n_members"] == seq[0]["n_members"]
    assert main(["audit", *TINY, "--engine", "ray", "--out", str(tmp_path / "again")]) == 0
    assert trained == [5]                       # every model came from the cache Ray filled
    assert _timeless(_rows(tmp_path / "again")) == _timeless(ray)   # the same models


def test_bad_ray_options_are_one_line_errors(local_ray, digits):
    with pytest.raises(CRLError, match=r"^ray\.chunk = 0: expected an integer >= 1 or null$"):
        get_engine("ray", chunk=0)
    with pytest.raises(CRLError, match=r"^ray\.inner = 'ray': expected one of: auto, ensemble, "):
        get_engine("ray", inner="ray")
    spec, recipe = ModelSpec.for_data("mlp", digits), Recipe(epochs=1, device="cpu")
    for option, words in (({"gpus_per_task": 1}, "gpus_per_task = 1: expected at most the 0 GPUs"),
                          ({"cpus_per_task": 3}, "cpus_per_task = 3: expected at most the 2 CPUs")):
        with pytest.raises(CRLError, match=rf"^ray\.{words} of the Ray cluster"):
            get_engine("ray", **option).train(spec, digits, recipe, "ce", {},
                                              _requests(digits, 1), progress=False)
    nan = Recipe(epochs=1, batch_size=32, lr=1e9, device="cpu")   # a CRLError in the worker
    with pytest.raises(CRLError, match=r"^training loss = nan at epoch 1") as err:
        get_engine("ray", inner="sequential").train(spec, digits, nan, "ce", {},
                                                    _requests(digits, 1), progress=False)
    assert type(err.value) is CRLError and "\n" not in str(err.value)


def _requests(digits, n: int) -> list[TrainRequest]:
    rng = np.random.default_rng(0)
    return [TrainRequest(seed=s, train_idx=np.sort(rng.choice(len(digits), 100, replace=False)))
            for s in range(n)]


def _dies_once_engine(marker):
    """A RayEngine whose first task (across retries and workers) kills its worker."""
    from crl.engine.ray_engine import RayEngine, train_chunk

    def dies_once(*args):
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return train_chunk(*args)
        os._exit(1)

    class DiesOnce(RayEngine):
        chunk_fn = staticmethod(dies_once)

    return DiesOnce


def test_a_task_whose_worker_dies_is_retried_and_returns_the_same_models(local_ray, digits,
                                                                          tmp_path):
    spec = ModelSpec.for_data("mlp", digits)
    recipe = Recipe(epochs=2, batch_size=32, lr=0.05, device="cpu")
    requests = _requests(digits, 2)
    engine = _dies_once_engine(tmp_path / "died")(chunk=1, inner="sequential", max_retries=1)
    done: list[int] = []
    got = engine.train(spec, digits, recipe, "crl", {}, requests, progress=False,
                       on_done=lambda i, out: done.append(i))
    assert (tmp_path / "died").exists() and sorted(done) == [0, 1]
    want = get_engine("sequential").train(spec, digits, recipe, "crl", {}, requests,
                                          progress=False)
    for a, b in zip(want, got):
        sa, sb = a.net.state_dict(), b.net.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        assert np.array_equal(a.trained_on, b.trained_on) and a.history == b.history
    no_retry = _dies_once_engine(tmp_path / "died-again")(chunk=2, max_retries=0)
    with pytest.raises(local_ray.exceptions.RayError):
        no_retry.train(spec, digits, recipe, "crl", {}, requests, progress=False)


def test_missing_ray_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)     # `import ray` raises ImportError
    with pytest.raises(CRLError, match=r"^engine 'ray' needs ray: pip install 'crl\[ray\]'$"):
        get_engine("ray")


@pytest.mark.parametrize("flags, message", [
    (["--ray-address", "HEAD:6379"], "ray_address = 'HEAD:6379': expected --engine ray with it"),
    (["--engine", "auto", "--ray-chunk", "4"], "ray_chunk = 4: expected --engine ray with it"),
    (["--engine", "ray", "--ray-chunk", "0"], "ray_chunk = 0: expected an integer >= 1"),
])
def test_ray_flags_need_the_ray_engine_and_write_nothing(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert main(["audit", *TINY, *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("crl: error:") and err.count("\n") == 1 and message in err, err
    assert not out.exists()
