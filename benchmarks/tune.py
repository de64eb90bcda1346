"""Hyper-parameter search for CRL (and RelaxLoss at matched accuracy), with its tables and figure.

Stage 1 ("screen"): every grid point, target models only, the cheap attacks (loss, confidence,
entropy, mentr, gradx), mean over seeds. Stage 2 ("confirm"): CE, the chosen CRL setting and the
RelaxLoss setting closest in test accuracy, with every attack (nn with shadows, LiRA and RMIA
with reference models).

    python benchmarks/tune.py --preset digits --out docs/tuning/digits
    python benchmarks/tune.py --preset cifar10 --data imagefolder:PATH --out docs/tuning/cifar10

Writes OUT.json (every row), OUT.md (tables) and OUT.png (privacy-utility curves).
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

import yaml

from crl.audit import Audit, DefenseChoice
from crl.audit.run import prepare
from crl.config import AuditConfig

CHEAP = ["loss", "confidence", "entropy", "mentr", "gradx"]
ALL = CHEAP + ["nn", "lira", "rmia"]


def grid(**axes):
    keys = list(axes)
    return [dict(zip(keys, vals)) for vals in itertools.product(*axes.values())]


PRESETS = {
    "digits": {
        "config": dict(dataset="digits", seeds=[0, 1, 2]),
        "full": dict(shadows=2, references=8),
        "curves": [dict(tau_rce=0.2, tau_rcl=0.1, alpha_rcl=0.0, lam=0.0)],   # ImpRelaxLoss
        "relaxloss": grid(alpha=[0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.8, 1.2]),
        # L_ct (tau_rcl 0.1) falls from ~20 to ~11 over training here, L_lce to 0.02 (tau_rce
        # 0.05) or 0.14 (tau_rce 0.2): alpha_rcl between 8 and 16 decides when centers relax.
        "crl": grid(tau_rce=[0.05, 0.2], alpha_rce=[0.1, 0.3, 0.5, 0.8],
                    tau_rcl=[0.1], alpha_rcl=[8.0, 16.0], lam=[0.1, 0.5])
        + grid(tau_rce=[0.2, 0.5], alpha_rce=[0.2, 0.3, 0.5], tau_rcl=[0.1],
               alpha_rcl=[10.0, 12.0, 14.0], lam=[0.03, 0.1, 0.2])
        # lam = 0: ImpRelaxLoss alone, to see what the centers add
        + grid(tau_rce=[0.05, 0.2, 0.5], alpha_rce=[0.1, 0.3, 0.5, 0.8], tau_rcl=[0.1],
               alpha_rcl=[0.0], lam=[0.0]),
    },
    "cifar10": {
        # 20k-sample subset (5k members): CPU budget; still the memorising regime (see docs).
        "config": dict(dataset="cifar10", model="cnn", seeds=[0], bf16=True,
                       channels_last=True, subset=20000, shadows=1),
        "confirm_attacks": CHEAP + ["nn"],
        # every attack per setting on a CPU budget: 1 shadow, 4 reference models (LiRA with the
        # fixed variance Carlini et al. use for few references, RMIA with 2 of them)
        "full": dict(shadows=1, references=4,
                     set={"lira": {"fixed_variance": True}, "rmia": {"num_refs": 2}}),
        "curves": [dict(tau_rce=0.2, tau_rcl=0.1, alpha_rcl=20.0, lam=0.1)],
        "relaxloss": grid(alpha=[0.3, 0.5, 1.0]),
        # tau_rce 0.2 caps logit norms near 5; L_ct (tau_rcl 0.1, 512-d features) sits near 30
        "crl": grid(tau_rce=[0.2], alpha_rce=[0.3, 0.5, 0.8], tau_rcl=[0.1], alpha_rcl=[30.0],
                    lam=[0.1])
        + [dict(tau_rce=0.1, alpha_rce=0.5, tau_rcl=0.1, alpha_rcl=30.0, lam=0.1),
           dict(tau_rce=0.2, alpha_rce=0.5, tau_rcl=0.1, alpha_rcl=25.0, lam=0.1),
           dict(tau_rce=0.2, alpha_rce=0.5, tau_rcl=0.1, alpha_rcl=0.0, lam=0.0)]
        # Second round. The first showed L_ct starts near 24 here: with alpha_rcl >= 25 the
        # center term relaxes from epoch 1, its (1 - p_y) ||q||^2 part drives the ReLU features
        # to zero and training collapses to chance. So alpha_rcl below the starting level:
        + grid(tau_rce=[0.2], alpha_rce=[0.3, 0.5, 0.8], tau_rcl=[0.1], alpha_rcl=[20.0],
               lam=[0.1])
        + [dict(tau_rce=0.2, alpha_rce=0.5, tau_rcl=0.1, alpha_rcl=14.0, lam=0.1)],
    },
}


def summarize(rows: list[dict]) -> dict:
    """Mean over seeds of accuracies and every attack's AUC / TPR; 'best_auc' = worst case."""
    attacks = list(rows[0]["attacks"])
    out = {"train_acc": np.mean([r["train_acc"] for r in rows]),
           "test_acc": np.mean([r["test_acc"] for r in rows]),
           "test_acc_std": np.std([r["test_acc"] for r in rows]),
           "auc": {a: float(np.mean([r["attacks"][a]["auc"] for r in rows])) for a in attacks},
           "tpr1": {a: float(np.mean([r["attacks"][a]["tpr_at_1pct_fpr"] for r in rows]))
                    for a in attacks}}
    out["best_auc"] = max(out["auc"].values())
    return out


def evaluate(audit: Audit, splits: dict, defense: str, params: dict, seeds) -> dict:
    """Audit one setting on every seed through the audit's stages (no config is mutated)."""
    choice = DefenseChoice(defense, params)
    for s in seeds:
        audit.check(choice, splits[s])
    rows = [audit.audit_one(choice, s, splits[s]).row() for s in seeds]
    return {"defense": defense, "params": params, "rows": rows, **summarize(rows)}


def session(overrides: dict, **fields) -> tuple[AuditConfig, Audit, dict]:
    """A resolved config, its Audit and the splits, for one stage."""
    cfg, audit, splits = prepare(AuditConfig(**{**fields, **overrides}), echo=lambda _: None)
    return cfg, audit, splits


def parse_overrides(items: list[str]) -> dict:
    """KEY=VALUE config fields (YAML values), e.g. epochs=2 seeds=[0] subset=300."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--override {item!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    p.add_argument("--data", help="dataset name override, e.g. imagefolder:PATH")
    p.add_argument("--out", required=True, help="output stem (OUT.json, OUT.md, OUT.png)")
    p.add_argument("--stage", choices=["screen", "confirm", "both", "full"], default="both",
                   help="full: every screened setting again with EVERY attack, on the preset's "
                        "'full' budget of shadow/reference models (cheap presets only)")
    p.add_argument("--shard", default="0/1", help="K/N: in --stage full, do every N-th setting "
                                                 "from K (run N processes side by side)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--max-acc-drop", type=float, default=0.01,
                   help="CRL's test accuracy may be at most this far below CE's")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="audit config field for every stage, e.g. epochs=2 (tiny test budgets)")
    p.add_argument("--max-settings", type=int, default=0,
                   help="keep only the first N grid settings per defense (0: all)")
    a = p.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    preset = PRESETS[a.preset]
    base = {**preset["config"], **parse_overrides(a.override)}
    if a.data:
        base["dataset"] = a.data
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    store = Path(f"{out}.json")
    state = json.loads(store.read_text()) if store.exists() else {"screen": [], "confirm": []}

    cfg, audit, splits = session({**base, "shadows": 0}, attacks=CHEAP,
                                 out=f"/tmp/crl-tune-{a.preset}", progress=False,
                                 defenses=["ce"])
    cut = a.max_settings or None
    done = {(e["defense"], json.dumps(e["params"], sort_keys=True)) for e in state["screen"]}
    t0, ran = time.time(), 0
    if a.stage in ("screen", "both"):
        jobs = [("ce", {})] + [("relaxloss", g) for g in preset["relaxloss"][:cut]] + \
               [("crl", g) for g in preset["crl"][:cut]]
        for defense, params in tqdm(jobs, desc="screen"):
            if (defense, json.dumps(params, sort_keys=True)) in done:
                continue
            state["screen"].append(evaluate(audit, splits, defense, params, cfg.seeds))
            ran += 1
            store.write_text(json.dumps(state, indent=1, default=float))
    if a.stage == "full":
        run_full(a, preset, base, state["screen"], Path(f"{out}.full"))
    state["full"] = merge_full(Path(f"{out}.full"))
    screen = state["screen"]
    ce = next(e for e in screen if e["defense"] == "ce")
    ok = [e for e in screen if e["defense"] == "crl"
          and e["test_acc"] >= ce["test_acc"] - a.max_acc_drop]
    chosen = min(ok, key=lambda e: e["best_auc"]) if ok else None
    relax = None
    if chosen is not None:
        relax = min((e for e in screen if e["defense"] == "relaxloss"),
                    key=lambda e: abs(e["test_acc"] - chosen["test_acc"]))
    from crl.defenses.crl import CRLDefense

    CRL_DEFAULTS = CRLDefense.spec.defaults()

    default = next((e for e in screen if e["defense"] == "crl" and
                    e["params"] == {k: CRL_DEFAULTS[k] for k in e["params"]}), None)
    if a.stage in ("confirm", "both") and chosen is not None and not state["confirm"]:
        full, audit, splits = session(base, attacks=preset.get("confirm_attacks", ALL),
                                      out=f"/tmp/crl-tune-{a.preset}-confirm", progress=False,
                                      defenses=["ce"])
        todo = [ce, chosen] + ([default] if default not in (None, chosen) else []) + [relax]
        for e in tqdm(todo, desc="confirm"):
            state["confirm"].append(evaluate(audit, splits, e["defense"], e["params"],
                                             full.seeds))
            ran += 1
            store.write_text(json.dumps(state, indent=1, default=float))
    seconds = dict(state.get("meta", {}).get("seconds", {}))
    if ran:   # a re-run that only re-renders adds no time
        before = seconds.get(a.stage, 0)
        seconds[a.stage] = (before if isinstance(before, int) else 0) + round(time.time() - t0)
    state["meta"] = {"command": f"python benchmarks/tune.py --preset {a.preset}"
                                + (f" --data {a.data}" if a.data else "") + f" --out {a.out}",
                     "machine": f"{platform.machine()} CPU, 2 cores, no GPU",
                     "date": str(date.today()), "seconds": seconds,
                     "full_budget": preset.get("full", {}),
                     "config": {k: v for k, v in cfg.to_dict().items()
                                if k not in ("set", "out", "progress")}}
    store.write_text(json.dumps(state, indent=1, default=float))
    write_markdown(Path(f"{out}.md"), state, ce, chosen, relax, a.max_acc_drop, default)
    plot_curves(Path(f"{out}.png"), screen, ce, chosen, default, preset.get("curves", []))
    print(Path(f"{out}.md").read_text())


def run_full(a, preset: dict, base: dict, screen: list[dict], stem: Path) -> None:
    """Every screened setting with every attack; shard K/N writes STEM.K.json."""
    if "full" not in preset:
        raise SystemExit(f"preset {a.preset} has no 'full' budget (too costly on CPU)")
    k, n = (int(v) for v in a.shard.split("/"))
    path = Path(f"{stem}.{k}.json")
    rows = json.loads(path.read_text()) if path.exists() else []
    done = {(e["defense"], json.dumps(e["params"], sort_keys=True)) for e in rows}
    full = {**base, **preset["full"], **parse_overrides(a.override)}
    cfg, audit, splits = session(full, attacks=ALL, progress=False,
                                 out=f"/tmp/crl-tune-{a.preset}-full{k}", defenses=["ce"])
    for e in tqdm(screen[k::n], desc=f"full {k}/{n}"):
        if (e["defense"], json.dumps(e["params"], sort_keys=True)) in done:
            continue
        if e["test_acc"] < 1.5 / audit.data.num_classes:   # collapsed to chance in the screen
            continue
        rows.append(evaluate(audit, splits, e["defense"], e["params"], cfg.seeds))
        path.write_text(json.dumps(rows, indent=1, default=float))


def merge_full(stem: Path) -> list[dict]:
    rows: list[dict] = []
    for path in sorted(stem.parent.glob(f"{stem.name}.*.json")):
        rows += json.loads(path.read_text())
    return rows


def _fmt_params(p: dict) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in p.items()) or "-"


def _table(entries: list[dict], attacks: list[str], key: str = "auc") -> list[str]:
    head = ["defense", "params", "train %", "test %"] + attacks + ["max"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        vals = [e[key][k] for k in attacks]
        scale, digits = (100, 1) if key != "auc" else (1, 3)
        lines.append("| " + " | ".join(
            [e["defense"], _fmt_params(e["params"]), f"{100 * e['train_acc']:.1f}",
             f"{100 * e['test_acc']:.1f}"] + [f"{scale * v:.{digits}f}" for v in vals]
            + [f"{scale * max(vals):.{digits}f}"]) + " |")
    return lines


def write_markdown(path: Path, state: dict, ce, chosen, relax, drop: float, default) -> None:
    meta = state["meta"]
    screen = sorted(state["screen"], key=lambda e: (e["defense"] != "ce", e["defense"],
                                                      -e["test_acc"]))
    lines = [f"Command: `{meta['command']}`", "",
             f"Machine: {meta['machine']}; date {meta['date']}; wall-clock seconds per stage "
             f"(re-runs skip finished settings): {meta['seconds']}.", "",
             f"Recipe: {json.dumps(meta['config'])}", ""]
    if state["confirm"]:
        attacks = list(state["confirm"][0]["auc"])
        lines += ["### Confirmation with every attack (AUC; max = the strongest attack)", ""]
        lines += _table(state["confirm"], attacks)
        lines += ["", "TPR at 1% FPR (%):", ""] + _table(state["confirm"], attacks, "tpr1") + [""]
    if chosen is None:
        lines += [f"No CRL setting kept test accuracy within {100 * drop:.0f} point(s) of CE.", ""]
    else:
        lines += [f"Chosen CRL setting (test accuracy >= CE - {100 * drop:.0f} pt, lowest max AUC):"
                  f" {_fmt_params(chosen['params'])}; RelaxLoss at the closest test accuracy: "
                  f"{_fmt_params(relax['params'])}.", ""]
    if default is not None:
        lines += [f"The library's default CRL setting ({_fmt_params(default['params'])}): "
                  f"train {100 * default['train_acc']:.1f}%, test {100 * default['test_acc']:.1f}%,"
                  f" max cheap-attack AUC {default['best_auc']:.3f} (CE: test "
                  f"{100 * ce['test_acc']:.1f}%, AUC {ce['best_auc']:.3f}).", ""]
    if state.get("full"):
        full = sorted(state["full"], key=lambda e: (e["defense"] != "ce", e["defense"],
                                                    -e["test_acc"]))
        budget = meta.get("full_budget", {})
        lines += [f"### Every setting, every attack (AUC, mean over seeds; {budget})", ""]
        lines += _table(full, list(full[0]["auc"])) + [""]
    lines += ["### Screen: every setting, cheap attacks (AUC, mean over seeds)", ""]
    lines += _table(screen, list(screen[0]["auc"]))
    path.write_text("\n".join(lines) + "\n")


def plot_curves(path: Path, screen: list[dict], ce: dict, chosen, default,
                curves: list[dict]) -> None:
    """Test accuracy vs the strongest attack's AUC; one line per defense as alpha varies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    relax = sorted((e for e in screen if e["defense"] == "relaxloss"),
                   key=lambda e: e["params"]["alpha"])
    ax.plot([e["best_auc"] for e in relax], [100 * e["test_acc"] for e in relax], "o-",
            label="RelaxLoss (alpha varies)")
    lines = list(curves)
    for anchor in (chosen, default):
        if anchor is None:
            continue
        fixed = {k: v for k, v in anchor["params"].items() if k != "alpha_rce"}
        if fixed not in lines:
            lines.append(fixed)
    for fixed in lines:
        line = sorted((e for e in screen if e["defense"] == "crl" and
                       {k: v for k, v in e["params"].items() if k != "alpha_rce"} == fixed),
                      key=lambda e: e["params"]["alpha_rce"])
        ax.plot([e["best_auc"] for e in line], [100 * e["test_acc"] for e in line], "s-",
                label=f"CRL (alpha_rce varies; {_fmt_params(fixed)})")
    others = [e for e in screen if e["defense"] == "crl"]
    ax.scatter([e["best_auc"] for e in others], [100 * e["test_acc"] for e in others], s=8,
               color="gray", alpha=0.4, label="other CRL grid points")
    ax.scatter([ce["best_auc"]], [100 * ce["test_acc"]], marker="*", s=160, color="k",
               label="CE (no defense)", zorder=5)
    ax.set_xlabel("strongest cheap attack's AUC (lower = more private)")
    ax.set_ylabel("test accuracy %")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
