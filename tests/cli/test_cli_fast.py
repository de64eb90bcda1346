"""The CLI answers at once where it needs no model: importing crl.cli, `--help` of every command,
`--version` and argument errors (unknown flags, bad choices, unknown names) never import torch.
Names and `crl list`'s text come from crl.core.catalog, which must hold exactly what the registries
hold."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import crl
from crl.core import catalog
from crl.core.catalog import NAMES, check_names
from crl.core.errors import CRLError

#: (argv, expected exit code, words expected in stdout + stderr)
CALLS = [
    (["--help"], 0, "crl COMMAND --help"),
    (["--version"], 0, f"crl {crl.__version__}"),
    (["audit", "--help"], 0, "--defenses"),
    (["tune", "--help"], 0, "--trials"),
    (["train", "--help"], 0, "--test-fraction"),
    (["report", "--help"], 0, "RUN"),
    (["list", "--help"], 0, "usage: crl list"),
    (["audit", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["nope"], 2, "invalid choice: 'nope'"),
    (["audit", "--epochs", "1.5"], 2, "epochs = 1.5: expected an integer >= 1"),
    (["audit", "--model", "nope"], 2, "unknown model 'nope'; expected one of: cnn,"),
    (["audit", "--defenses", "ce,crll"], 2, "unknown defense 'crll' (did you mean 'crl'?)"),
    (["train", "--defense", "crll"], 2, "unknown defense 'crll' (did you mean 'crl'?)"),
    (["tune", "--compare", "nope"], 2, "unknown defense 'nope'"),
    (["tune", "--confirm-attacks", "lria"], 2, "unknown attack 'lria' (did you mean"),
]

PROBE = """
import contextlib, io, json, sys
from crl.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    results.append([code, out.getvalue() + err.getvalue()])
print(json.dumps({"results": results, "torch": "torch" in sys.modules}))
"""


def _probe(argvs: list[list[str]], cwd: Path, cache: Path | None = None) -> dict:
    """`crl.cli.main(argv)` for each argv in a fresh Python (with CRL_CACHE=`cache` if given):
    each exit code and output, and whether torch was imported."""
    src = str(Path(crl.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    if cache is not None:
        env["CRL_CACHE"] = str(cache)
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argvs)], capture_output=True,
                       text=True, cwd=cwd, env=env, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_help_version_and_argument_errors_never_import_torch(tmp_path):
    answer = _probe([argv for argv, _, _ in CALLS], tmp_path)
    for (argv, code, words), (got_code, text) in zip(CALLS, answer["results"]):
        assert got_code == code and words in text, (argv, got_code, text)
    assert not answer["torch"], "crl.cli imported torch"
    assert not any(tmp_path.iterdir())          # an argument error writes nothing


def test_the_catalog_lists_exactly_the_registered_names():
    from crl.cli import _registries

    for reg in _registries():
        assert NAMES[reg.kind] == tuple(reg.names()), (
            f"crl.core.catalog.NAMES[{reg.kind!r}] must be {tuple(reg.names())}")


@pytest.mark.parametrize("kind,name", [("model", "nope"), ("defense", "crll"),
                                       ("attack", "lria"), ("attack", "LIRA_offline")])
def test_the_catalog_fails_and_accepts_names_as_the_registry_does(kind, name):
    from crl.cli import _registries

    registry = {reg.kind: reg for reg in _registries()}[kind]
    try:
        registry.get(name)
    except CRLError as e:
        with pytest.raises(CRLError) as caught:
            check_names(kind, [name])
        assert str(caught.value) == str(e)
    else:
        check_names(kind, [name])


def test_crl_list_prints_the_catalog_without_torch_even_with_an_empty_cache(tmp_path):
    answer = _probe([["list"]], tmp_path, cache=tmp_path / "empty-cache")
    assert answer["results"] == [[0, catalog.LIST_FILE.read_text(encoding="utf-8")]]
    assert not answer["torch"], "crl list imported torch"


def test_the_list_catalog_is_what_the_registries_list():
    from crl.cli import list_lines

    assert catalog.list_text().split("\n") == list_lines(), (
        "src/crl/core/catalog.txt differs from the registries: run `crl list --write-catalog`")


def test_the_list_catalog_is_regenerated_from_the_registries(tmp_path, monkeypatch):
    from crl.cli import list_lines, main

    monkeypatch.setattr(catalog, "LIST_FILE", tmp_path / "catalog.txt")
    assert main(["list", "--write-catalog"]) == 0
    assert catalog.list_text().split("\n") == list_lines()
