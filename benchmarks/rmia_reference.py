"""Reference scores for tests/attacks/test_rmia_reference.py, computed ONCE by the RMIA
authors' code.

crl does not vendor the authors' code. This script builds a small deterministic set of logits
(1 target + 8 reference models in 4 complementary pairs, 50 pool samples, 20 population samples
that no model trained on, 10 classes), passes them to the authors' own functions, imported from
local copies given on the command line, and saves inputs and outputs to an npz:

  --research DIR  main.py and signals.py of research/2024_rmia, privacytrustlab/ml_privacy_meter
                  at commit d32734161a3395211fe5f3cd461932290b1fafbe (the paper's code, linked
                  from the paper's README); their `aggregate_signals` and `convert_signals`.
  --meter FILE    modules/mia/attacks/rmia.py of the same repository at commit
                  e384af8fd9319b8eeb1303aa82474df1441e3c59 (the maintained tool); `run_rmia`.

How the copies were made (not committed):
  git -C ml_privacy_meter show d3273416...:research/2024_rmia/main.py    > R/main.py
  git -C ml_privacy_meter show d3273416...:research/2024_rmia/signals.py > R/signals.py
  git -C ml_privacy_meter show e384af8f...:modules/mia/attacks/rmia.py  > meter_rmia.py
  python benchmarks/rmia_reference.py --research R --meter meter_rmia.py \\
      --out tests/attacks/data/rmia_reference.npz

main.py imports pandas, seaborn, memory_profiler and their plot.py, none of which the scoring
uses; they are replaced by empty stand-ins here. Their `aggregate_signals` needs every sample to
have num_ref_models // 2 IN models as well as OUT ones, so each population sample is marked IN
for the last 4 reference models in THEIR membership matrix (crl's population is never trained
on): offline, both then use the first k models for z, all OUT; online with all 8 references,
both use all 8. The logits are the same either way.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

M, N, Z, C = 9, 50, 20, 10      # models (target + 8 references), pool, population, classes


def make_inputs(seed: int = 2024) -> dict[str, np.ndarray]:
    """Seeded logits: members' true-class logit is raised, per-sample difficulty varies."""
    rng = np.random.default_rng(seed)
    member = np.zeros((M, N), bool)
    member[0, rng.permutation(N)[: N // 2]] = True
    for j in range(1, M, 2):                               # complementary pairs (1,2), (3,4), ...
        member[j, rng.permutation(N)[: N // 2]] = True
        member[j + 1] = ~member[j]
    labels = rng.integers(0, C, N)
    logits = rng.normal(0, 1, (M, N, C))
    logits[:, np.arange(N), labels] += rng.normal(2, 2, N) + 2.5 * member
    pop_labels = rng.integers(0, C, Z)
    pop_logits = rng.normal(0, 1, (M, Z, C))
    pop_logits[:, np.arange(Z), pop_labels] += rng.normal(2, 2, Z)
    return {"logits": logits, "member": member, "labels": labels,
            "pop_logits": pop_logits, "pop_labels": pop_labels}


def load_module(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def stand_ins() -> None:
    """Empty modules for imports of main.py that the scoring never uses."""
    for name in ("pandas", "seaborn", "plot", "memory_profiler"):
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)
    sys.modules["memory_profiler"].profile = lambda f: f
    sys.modules["plot"].plot_roc = lambda *a, **k: None


def research_scores(research: Path, x: dict, *, offline: bool, num_ref_models: int, a: float,
                    gamma: float, temperature: float, trim: float) -> np.ndarray:
    """-prediction of the authors' aggregate_signals for target model 0 on the pool samples."""
    import torch

    sys.path.insert(0, str(research))
    stand_ins()
    signals = load_module("signals", research / "signals.py")
    main = load_module("rmia_research_main", research / "main.py")
    logits = np.concatenate([x["logits"], x["pop_logits"]], axis=1)        # [M, N+Z, C]
    labels = torch.from_numpy(np.concatenate([x["labels"], x["pop_labels"]]))
    sig = torch.stack([signals.convert_signals(torch.from_numpy(lg), labels, "softmax",
                                               temp=temperature).reshape(-1) for lg in logits])
    keep = np.concatenate([x["member"], np.zeros((M, Z), bool)], axis=1)
    keep[-4:, N:] = True                       # see the module docstring (never used offline)
    population = np.zeros(N + Z, bool)
    population[N:] = True
    tmp = tempfile.mkdtemp()
    Path(tmp, "r").mkdir()
    main.log_dir, main.model_index = tmp, 0    # globals their non-augmented branch writes with
    configs = {"audit": {"num_ref_models": num_ref_models, "offline": str(offline),
                         "offline_a": a, "augmentation": "none", "nb_augmentation": 2,
                         "top_k": -1, "gamma": gamma, "proportiontocut": trim,
                         "report_log": "r"}}
    pred, answers = main.aggregate_signals(
        "softmax_relative", keep[0], sig[0][:, None], np.arange(N + Z), keep[1:],
        sig[1:][:, :, None], population, configs)
    assert np.array_equal(answers[:N], x["member"][0])
    return -np.asarray(pred, np.float64).ravel()[:N]


def meter_scores(meter: Path, x: dict, *, a: float, k: int) -> np.ndarray:
    """The maintained tool's run_rmia (gamma 1, plain mean, temperature 1) on target model 0."""
    from scipy.special import softmax

    mod = load_module("rmia_meter", meter)
    p = softmax(x["logits"], axis=-1)[:, np.arange(N), x["labels"]]            # [M, N]
    pz = softmax(x["pop_logits"], axis=-1)[:, np.arange(Z), x["pop_labels"]]
    return np.asarray(mod.run_rmia(p[0], p[1:].T, x["member"][1:].T, pz[0], pz[1:1 + k].T,
                                   a, k), np.float64)


CASES = {   # name: (offline, num_ref_models as THEIR config counts it, a, gamma)
    "research_offline_k4_g2": (True, 8, 0.3, 2.0),
    "research_offline_k2_g2": (True, 4, 0.3, 2.0),
    "research_offline_k4_g1": (True, 8, 0.6, 1.0),
    "research_online_8_g2": (False, 8, 0.3, 2.0),
    "research_online_8_g1": (False, 8, 0.3, 1.0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--research", type=Path, required=True)
    ap.add_argument("--meter", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("tests/attacks/data/rmia_reference.npz"))
    args = ap.parse_args()
    x = make_inputs()
    out = dict(x)
    for name, (offline, nref, a, gamma) in CASES.items():
        out[name] = research_scores(args.research, x, offline=offline, num_ref_models=nref, a=a,
                                    gamma=gamma, temperature=2.0, trim=0.2)
    out["meter_offline_k4_a0.3"] = meter_scores(args.meter, x, a=0.3, k=4)
    out["meter_offline_k4_a1.0"] = meter_scores(args.meter, x, a=1.0, k=4)
    np.savez_compressed(args.out, **out)
    for k, v in out.items():
        if k not in x:
            print(f"{k}: mean {v.mean():.4f}, distinct {len(np.unique(v))}")


if __name__ == "__main__":
    main()
