"""Does today's `fit` train the model that the pre-refactor `fit` (commit 64f7cf0) trained, when
both get the same initial weights, training indices, batch order and CRL centers?

The staged-audit refactor changed how seeds become random streams (named SeedSequence streams
instead of integer arithmetic), so the default audit's numbers moved. This script separates
that change from everything else: it trains one digits MLP per defense with the digits default
recipe under both versions of the code, with every random input pinned to the new streams, and
compares the final logits on all 1,797 digits images.

    git worktree add /tmp/crl-old 64f7cf0
    python benchmarks/refactor_check.py --old-src /tmp/crl-old/src

Second, `--old-seeds N`: the pre-refactor default audit (`crl audit --attacks loss --shadows 0
--seeds 0..N-1`, old code) against today's `fit` given the old seed mapping (split seed s,
`torch.manual_seed(s)` before building the model, one generator seeded with s for the shuffle and
CRL's centers): per seed, the target's test accuracy and loss-attack AUC. Equal rows mean the
audit's numbers moved only because the seeds now name other random streams.

Third, `--baseline SRC`: the engines of another checkout (commit f9d09ce, before each defense's
objective was written once over K >= 1 models) against today's, with nothing pinned (both name
the same seed streams): three digits MLPs per defense (100 training samples each, the digits
default recipe) trained by the sequential engine and by the ensemble engine (baddbmm), final
logits on all 1,797 images compared bit for bit.

    git worktree add /tmp/crl-old-obj f9d09ce
    python benchmarks/refactor_check.py --baseline /tmp/crl-old-obj/src

Each version runs in its own process (both packages are named `crl`): `--impl` selects the one
this process imports, and the parent compares the logits they write. Pinned: the model's initial
state dict (built once by the new code after torch.manual_seed(i), i = 0..--inits-1), the
training indices (100 digits samples), the shuffle
(the old loop seeded its one generator with `recipe.seed`; it is given the new "shuffle"
stream's seed) and CRL's initial centers (the old defense drew them from `recipe.seed`; it is
given the new "centers" stream's generator).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SEED = 7
DEFENSES = ("ce", "crl", "relaxloss")


def _module(*names: str):
    """The first of `names` this process's `crl` has (today's layout first, then the old one's)."""
    import importlib

    for name in names:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            continue
    raise SystemExit(f"none of {names} in this crl")


def _train(impl: str, defense: str, work: Path) -> None:
    """In this process's `crl` (old or new): train and write logits to work/<impl>-<defense>.pt."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from crl.data.datasets import load_dataset
    from crl.models import create_model

    data = load_dataset("digits")
    train_idx = np.sort(np.random.default_rng(0).choice(len(data), 100, replace=False))
    init = work / "init.pt"
    if not init.exists():
        torch.manual_seed(int(os.environ["CRL_CHECK_INIT"]))   # torch's own seed is random
        model = create_model("mlp", data.x.shape[1], data.x.shape[-1], data.num_classes)
        torch.save(model.state_dict(), init)
    model = create_model("mlp", data.x.shape[1], data.x.shape[-1], data.num_classes)
    model.load_state_dict(torch.load(init, weights_only=True))
    recipe_args = {"epochs": 60, "batch_size": 32, "lr": 0.05, "device": "cpu"}
    from crl.defenses import build_defense  # both versions have these two
    fit = _module("crl.engine.fit", "crl.train").fit
    if impl == "new":
        Recipe = _module("crl.training.recipe", "crl.recipe").Recipe
        recipe = Recipe(seed=SEED, **recipe_args)
    else:
        from crl.train import Recipe as OldRecipe

        import crl.losses.crl as old_losses
        new_seeds = json.loads(os.environ["CRL_CHECK_SEEDS"])
        recipe = OldRecipe(seed=new_seeds["shuffle"], **recipe_args)
        init_centers = old_losses.CRLLoss.__init__

        def pinned(self, *a, generator=None, **kw):
            init_centers(self, *a, generator=torch.Generator().manual_seed(new_seeds["centers"]),
                         **kw)

        old_losses.CRLLoss.__init__ = pinned
    d = build_defense(defense, {})
    trace = _trace_relaxloss() if defense == "relaxloss" else []
    result = fit(model, data, train_idx, recipe, d, progress=False)
    with torch.no_grad():
        from crl.data.types import normalize
        logits = result.model.eval()(normalize(data.x, data.mean, data.std))
    torch.save({"logits": logits, "params": dict(d.params), "x_sum": int(data.x.long().sum()),
                "mean": list(data.mean), "std": list(data.std), "trace": trace},
               work / f"{impl}-{defense}.pt")


def _trace_relaxloss() -> list[tuple[int, float, str, float]]:
    """Record (epoch, l_ce, branch, loss) of every RelaxLoss step in this process's `crl`: the
    module's forward in the old code, the one formulation over K models in today's."""
    import crl.defenses.relaxloss as defense
    from crl.losses.relaxloss import RelaxLoss

    trace: list[tuple[int, float, str, float]] = []
    if hasattr(defense, "relaxloss_batched") and not hasattr(defense.RelaxLossDefense,
                                                              "batched_loss"):
        batched = defense.relaxloss_batched

        def traced_batched(logits, targets, alpha, epoch, **options):
            loss = batched(logits, targets, alpha, epoch, **options)
            stats = options["stats"]
            trace.append((int(epoch), float(stats["l_ce"][0]), str(stats["branch"][0]),
                          float(loss.detach()[0])))
            return loss

        defense.relaxloss_batched = traced_batched
        return trace
    forward = RelaxLoss.forward

    def traced(self, logits, targets, epoch):
        loss = forward(self, logits, targets, epoch)
        trace.append((int(epoch), float(self.last_stats["l_ce"]), str(self.last_stats["branch"]),
                      float(loss.detach())))
        return loss

    RelaxLoss.forward = traced
    return trace


def _first_parting(old: list, new: list, alpha: float) -> str:
    """Where two RelaxLoss traces first differ: the step, whether it is a branch flip, and
    how close the batch-mean cross-entropy was to alpha there."""
    for step, (o, n) in enumerate(zip(old, new), start=1):
        if o == n:
            continue
        epoch, l_old, b_old, _ = o
        _, l_new, b_new, _ = n
        what = (f"branch {b_old} -> {b_new}" if b_old != b_new
                else f"same branch ({b_old})")
        before = old[step - 2][2] if step > 1 else "none"
        relax = sum(t[2] == "relax" for t in old[:step - 1])
        flips = [(i, abs(x[1] - alpha)) for i, (x, y) in enumerate(zip(old, new), start=1)
                 if x[2] != y[2]]
        first_flip = (f"; first branch flip at step {flips[0][0]} (|l_ce - alpha| = "
                      f"{flips[0][1]:.2e})" if flips else "; no branch flip")
        return (f"first differs at step {step} (epoch {epoch}): l_ce {l_old:.9g} vs {l_new:.9g}, "
                f"{what}; the step before took {before}, {relax} relax step(s) before "
                f"it{first_flip}")
    return f"identical over {min(len(old), len(new))} steps"


def _old_audit(old_src: str, seeds: int, work: str) -> dict[tuple[str, int], tuple[float, float]]:
    """(defense, seed) -> (test accuracy, loss AUC) of the old code's default-recipe audit."""
    out = os.path.join(work, "old-audit")
    env = {**os.environ, "PYTHONPATH": old_src, "CRL_CACHE": os.path.join(work, "cache-old"),
           "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "crl.cli", "audit", "--quiet", "--attacks", "loss",
                    "--shadows", "0", "--seeds", ",".join(map(str, range(seeds))),
                    "--out", out], env=env, check=True, stdout=subprocess.DEVNULL)
    rows = json.loads((Path(out) / "results.json").read_text())
    return {(r["defense"], r["seed"]): (r["test_acc"], r["attacks"]["loss"]["auc"]) for r in rows}


def _new_with_old_seeds(defense: str, seed: int) -> tuple[float, float]:
    """Today's fit and metrics on the old audit's split, initialisation and streams for `seed`."""
    import numpy as np
    import torch

    from crl.data.datasets import load_dataset
    from crl.data.splits import make_pool_split
    from crl.defenses import base, build_defense
    from crl.models import create_model

    train = _module("crl.engine.fit", "crl.train")
    predict_logits = _module("crl.models.evaluation", "crl.evaluation").predict_logits
    attack_metrics = _module("crl.attacks.metrics", "crl.metrics").attack_metrics
    Recipe = _module("crl.training.recipe", "crl.recipe").Recipe

    def one_stream(s: int, *_path) -> torch.Generator:   # the old code: one seed, no streams
        return torch.Generator().manual_seed(int(s))

    train.torch_generator = base.torch_generator = one_stream
    data = load_dataset("digits")
    split = make_pool_split(data.y.numpy(), seed=seed, subset=400)
    torch.manual_seed(seed)
    model = create_model("mlp", data.x.shape[1], data.x.shape[-1], data.num_classes)
    recipe = Recipe(epochs=60, batch_size=32, lr=0.05, seed=seed, device="cpu")
    model = train.fit(model, data, split.target_members, recipe, build_defense(defense, {}),
                      progress=False).model.eval()
    idx = np.concatenate([split.target_members, split.target_nonmembers])
    logits = predict_logits(model, data, idx)
    y = data.y[torch.as_tensor(idx)]
    loss = torch.nn.functional.cross_entropy(logits, y, reduction="none").numpy()
    member = np.r_[np.ones(len(split.target_members)), np.zeros(len(split.target_nonmembers))]
    test = (logits.argmax(1) == y)[len(split.target_members):].float().mean().item()
    return test, attack_metrics(-loss, member)["auc"]


def _seeds_table(old_src: str, seeds: int) -> None:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        old = _old_audit(old_src, seeds, work)
    print("| defense | seed | old audit: test acc | loss AUC | today's fit, old seeds: test acc "
          "| loss AUC |\n|---|---|---|---|---|---|")
    for defense in ("ce", "crl"):
        for seed in range(seeds):
            acc, auc = _new_with_old_seeds(defense, seed)
            o_acc, o_auc = old[(defense, seed)]
            print(f"| {defense} | {seed} | {100 * o_acc:.1f} | {o_auc:.4f} | {100 * acc:.1f} "
                  f"| {auc:.4f} |", flush=True)


def _engines(work: Path, defenses: list[str]) -> None:
    """In this process's `crl`: three digits MLPs per defense and engine; their final logits
    and histories to work/<impl>-engines.pt."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from crl.data.datasets import load_dataset
    from crl.data.types import normalize
    from crl.engine import TrainRequest, get_engine
    from crl.models.spec import ModelSpec

    Recipe = _module("crl.training.recipe", "crl.recipe").Recipe

    data = load_dataset("digits")
    rng = np.random.default_rng(0)
    requests = [TrainRequest(seed=s, train_idx=rng.choice(len(data), 100, replace=False))
                for s in range(3)]
    recipe = Recipe(epochs=60, batch_size=32, lr=0.05, device="cpu")
    spec = ModelSpec.for_data("mlp", data)
    x = normalize(data.x, data.mean, data.std)
    out = {}
    for engine in ("sequential", "ensemble"):
        for defense in defenses:
            models = get_engine(engine).train(spec, data, recipe, defense, {}, requests,
                                              progress=False)
            with torch.no_grad():
                out[(engine, defense)] = ([m.net(x) for m in models],
                                          [m.history for m in models])
    torch.save(out, work / f"{os.environ['CRL_CHECK_IMPL']}-engines.pt")


def _baseline(old_src: str, defenses: list[str]) -> None:
    """Today's engines against those of `old_src`: one row per engine and defense."""
    import torch

    new_src = str(Path(__file__).resolve().parents[1] / "src")
    with tempfile.TemporaryDirectory() as work:
        for impl, src in (("new", new_src), ("old", old_src)):
            env = {**os.environ, "PYTHONPATH": src, "CRL_CHECK_IMPL": impl,
                   "CRL_CACHE": os.path.join(work, f"cache-{impl}"), "OMP_NUM_THREADS": "1"}
            subprocess.run([sys.executable, __file__, "--engines", "--work", work,
                            "--defenses", ",".join(defenses)], env=env, check=True)
        old, new = (torch.load(Path(work) / f"{impl}-engines.pt", weights_only=False)
                    for impl in ("old", "new"))
    print("| engine | defense | models bitwise equal | max |logit difference| | max |logit| "
          "| same predictions | max |history difference| |\n|---|---|---|---|---|---|---|")
    for key in old:
        (o_logits, o_hist), (n_logits, n_hist) = old[key], new[key]
        equal = sum(torch.equal(a, b) for a, b in zip(o_logits, n_logits))
        diff = max((a - b).abs().max().item() for a, b in zip(o_logits, n_logits))
        scale = max(b.abs().max().item() for b in n_logits)
        preds = all(bool((a.argmax(1) == b.argmax(1)).all()) for a, b in zip(o_logits, n_logits))
        print(f"| {key[0]} | {key[1]} | {equal} of {len(n_logits)} | {diff:.2e} | {scale:.1f} "
              f"| {preds} | {_history_gap(o_hist, n_hist)} |")


def _history_gap(old: list, new: list) -> str:
    """The largest difference of any logged number of any epoch of any model (keys too)."""
    gaps = [abs(o[key] - n[key]) for ho, hn in zip(old, new) for o, n in zip(ho, hn)
            for key in o if key in n]
    same_keys = all(o.keys() == n.keys() for ho, hn in zip(old, new) for o, n in zip(ho, hn))
    return f"{max(gaps):.1e}" + ("" if same_keys else " (other keys)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old-src", help="src/ of a checkout of commit 64f7cf0")
    p.add_argument("--impl", choices=("old", "new"), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--defenses", default=",".join(DEFENSES))
    p.add_argument("--inits", type=int, default=5,
                   help="initial weights from torch.manual_seed(0..N-1), one comparison each")
    p.add_argument("--old-seeds", type=int, metavar="N",
                   help="compare the old default audit with today's fit on the old seeds 0..N-1")
    p.add_argument("--baseline", metavar="SRC",
                   help="compare both engines with those of SRC (src/ of commit f9d09ce)")
    p.add_argument("--engines", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.engines:
        return _engines(Path(a.work), a.defenses.split(","))
    if a.baseline:
        return _baseline(a.baseline, a.defenses.split(","))
    if a.impl:
        for defense in a.defenses.split(","):
            _train(a.impl, defense, Path(a.work))
        return
    if not a.old_src or not (Path(a.old_src) / "crl" / "train.py").exists():
        raise SystemExit(f"--old-src = {a.old_src!r}: expected the src/ folder of a checkout of "
                         "commit 64f7cf0 (git worktree add /tmp/crl-old 64f7cf0)")
    if a.old_seeds:
        return _seeds_table(a.old_src, a.old_seeds)
    seed_for = _module("crl.core.seeding", "crl.seeding").seed_for
    seeds = {"shuffle": seed_for(SEED, "shuffle"), "centers": seed_for(SEED, "centers")}
    new_src = str(Path(__file__).resolve().parents[1] / "src")
    print("| init seed | defense | same data | same params | max |logit difference| | max |logit| "
          "| same predictions |\n|---|---|---|---|---|---|---|")
    for init_seed in range(a.inits):
        _compare(a, seeds, new_src, init_seed)
    if "relaxloss" in a.defenses.split(","):
        print(_relax_gradients(a.old_src))


def _relax_gradients(old_src: str, trials: int = 200) -> str:
    """Old vs new RelaxLoss gradient in the posterior-flattening branch (alpha 5: every random
    batch takes it), on identical random logits: rounding or a different formula?"""
    import importlib.util

    import torch

    from crl.losses.relaxloss import RelaxLoss as NewRelaxLoss

    where = importlib.util.spec_from_file_location("old_relaxloss",
                                                   Path(old_src) / "crl/losses/relaxloss.py")
    old = importlib.util.module_from_spec(where)
    where.loader.exec_module(old)
    gen = torch.Generator().manual_seed(0)
    worst, equal = 0.0, 0
    for _ in range(trials):
        logits = (3 * torch.randn(32, 10, generator=gen)).requires_grad_()
        y = torch.randint(0, 10, (32,), generator=gen)
        old_g, new_g = (torch.autograd.grad(cls(10, alpha=5.0)(logits, y, 1), logits)[0]
                        for cls in (old.RelaxLoss, NewRelaxLoss))
        worst = max(worst, ((old_g - new_g).abs().max() / old_g.abs().max()).item())
        equal += bool(torch.equal(old_g, new_g))
    return (f"RelaxLoss relax-branch gradient, old vs new code, {trials} random batches: "
            f"{equal} bitwise equal, max difference {worst:.2e} of the largest entry")


def _compare(a: argparse.Namespace, seeds: dict, new_src: str, init_seed: int) -> None:
    """Both versions from the initial weights of torch.manual_seed(init_seed); one row each."""
    import torch

    with tempfile.TemporaryDirectory() as work:
        for impl, src in (("new", new_src), ("old", a.old_src)):
            env = {**os.environ, "PYTHONPATH": src, "CRL_CHECK_SEEDS": json.dumps(seeds),
                   "CRL_CHECK_INIT": str(init_seed),
                   "CRL_CACHE": os.path.join(work, f"cache-{impl}")}
            subprocess.run([sys.executable, __file__, "--impl", impl, "--work", work,
                            "--defenses", a.defenses], env=env, check=True)
        for defense in a.defenses.split(","):
            old = torch.load(Path(work) / f"old-{defense}.pt", weights_only=True)
            new = torch.load(Path(work) / f"new-{defense}.pt", weights_only=True)
            same_data = (old["x_sum"], old["mean"], old["std"]) == (new["x_sum"], new["mean"],
                                                                   new["std"])
            diff = (old["logits"] - new["logits"]).abs().max().item()
            preds = bool((old["logits"].argmax(1) == new["logits"].argmax(1)).all())
            print(f"| {init_seed} | {defense} | {same_data} | {old['params'] == new['params']} "
                  f"| {diff:.2e} | {new['logits'].abs().max().item():.1f} | {preds} |")
            if defense == "relaxloss":
                parting = _first_parting(old['trace'], new['trace'], new['params']['alpha'])
                print(f"  relaxloss trace: {parting}")
            if old["params"] != new["params"]:
                print(f"  old params {old['params']}\n  new params {new['params']}")


if __name__ == "__main__":
    main()
