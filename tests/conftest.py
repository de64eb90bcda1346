import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own dataset/model cache, never the user's."""
    monkeypatch.setenv("CRL_CACHE", str(tmp_path_factory.mktemp("crl-cache")))
    torch.set_num_threads(1)   # tiny models: one thread is faster and avoids oversubscription


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    import os

    os.environ.setdefault("CRL_CACHE", str(tmp_path_factory.mktemp("crl-cache-digits")))
    from crl.data.datasets import load_dataset

    return load_dataset("digits")
