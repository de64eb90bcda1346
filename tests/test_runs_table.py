"""benchmarks/runs_table.py: the tables docs quote are read from results.json unchanged."""
from __future__ import annotations

import json

import pytest
from benchmark_scripts import load_benchmark

from crl.cli import main

runs_table = load_benchmark("runs_table")


def test_tables_quote_results_json(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["audit", "--subset", "300", "--epochs", "2", "--seeds", "0", "--defenses", "ce",
                 "--attacks", "loss,gap", "--canaries", "30", "--references", "1",
                 "--shadows", "0", "--no-cache", "--quiet", "--out", str(out)]) == 0
    row = json.loads((out / "results.json").read_text())[0]
    capsys.readouterr()
    runs_table.main([str(out), "--attacks", "loss,gap"])
    table = capsys.readouterr().out
    auc = row["attacks"]["gap"]["auc"]
    lo, hi = row["attacks"]["gap"]["auc_ci"]
    assert f"{auc:.3f} [{lo:.3f}, {hi:.3f}]" in table
    assert f"| ce | 0 | {100 * row['train_acc']:.1f} | {100 * row['test_acc']:.1f} |" in table
    runs_table.main([str(out), "--epsilon"])
    one = row["canaries"]["epsilon_lower_bound"]["one_run"]
    assert f"| {one['epsilon_lower_bound']:.2f} | {one['ceiling']:.2f} |" in capsys.readouterr().out


def test_a_folder_without_results_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="no results.json"):
        runs_table.main([str(tmp_path)])
