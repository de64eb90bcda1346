"""report.html (rendered from report.md, self-contained, checked in a real headless browser) and
`crl report RUN` (the report rebuilt from a finished run without training)."""
import base64
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from crl.cli import main
from crl.core.errors import CRLError
from crl.report.html import render_page

TINY = ["--epochs", "3", "--subset", "200", "--seeds", "0", "--quiet", "--shadows", "0",
        "--references", "8", "--defenses", "ce,crl",
        "--attacks", "loss,confidence,entropy,mentr,gradx,lira,rmia"]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class _Tags(HTMLParser):
    """Every start tag with its attributes, and the page's text."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def all(self, name: str) -> list[dict]:
        return [a for t, a in self.tags if t == name]


def _png(path: Path, size=(6, 4)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8), "RGB").save(buf, "PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _no_network(page: str) -> None:
    """No URL the browser would fetch: every src/href is a data URI or an in-page anchor."""
    for m in re.finditer(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]+)""", page):
        assert m.group(1).startswith(("data:", "#")), m.group(0)[:80]
    assert not re.search(r"url\(|@import|<link|<script", page, re.IGNORECASE)


MARKDOWN = """# Audit: digits / `mlp`

> **WARNING (ce, seed 0): target at chance**

First line of a paragraph
and its second line, with `code <b>` and **bold**.

## Table `one`

| Defense | AUC | note |
|---|---|---|
| ce | 0.640 [0.5, 0.7] | **x** |
| crl | 0.600 | `a` |

- item one
- item **`two`**

![margins](figures/m.png)

```
raw <script>alert(1)</script>
```

<script>alert(2)</script> | not a table
"""


def test_markdown_subset_becomes_self_contained_html(tmp_path):
    png = _png(tmp_path / "figures" / "m.png")
    page = render_page(tmp_path, MARKDOWN)
    tags = _Tags(page)
    assert [t for t, _ in tags.tags if t in ("h1", "h2")] == ["h1", "h2"]
    assert "<title>Audit: digits / mlp</title>" in page
    assert tags.all("blockquote")[0]["class"] == "warning"
    assert ("<p>First line of a paragraph and its second line, with <code>code &lt;b&gt;</code> "
            "and <strong>bold</strong>.</p>") in page
    assert len(tags.all("table")) == 1 and len(tags.all("tr")) == 3 and len(tags.all("li")) == 2
    assert '<td data-label="AUC">0.640 [0.5, 0.7]</td>' in page
    assert '<td data-label="note"><strong>x</strong></td>' in page
    assert "<li>item <strong><code>two</code></strong></li>" in page
    (img,) = tags.all("img")
    assert img["alt"] == "margins"
    assert base64.b64decode(img["src"].split(",", 1)[1]) == png
    assert "raw &lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;script&gt;alert(2)&lt;/script&gt; | not a table" in page
    _no_network(page)


@pytest.mark.parametrize("src, expected", [
    ("http://example.com/x.png", "expected a relative path"),
    ("/etc/x.png", "expected a relative path"),
    ("../outside.png", "expected a file under"),
    ("figures/missing.png", "expected a file under"),
    ("figures/notes.txt", "expected one of .gif"),
])
def test_an_image_that_is_not_a_figure_of_the_run_is_refused(tmp_path, src, expected):
    (tmp_path / "run" / "figures").mkdir(parents=True)
    _png(tmp_path / "outside.png")
    (tmp_path / "run" / "figures" / "notes.txt").write_text("x")
    with pytest.raises(CRLError, match=re.escape(expected)) as e:
        render_page(tmp_path / "run", f"![x]({src})\n")
    assert str(e.value).startswith(f"report image = {src!r}: expected")


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """One tiny finished audit (read-only for the tests: copy it before changing it)."""
    root = tmp_path_factory.mktemp("html")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRL_CACHE", str(root / "cache"))
        assert main(["audit", *TINY, "--out", str(root / "run")]) == 0
    return root / "run"


def test_the_report_opens_with_the_verdict_then_what_shows_it_then_the_full_tables(audited):
    md = (audited / "report.md").read_text()
    heads = re.findall(r"^## (.*)$", md, re.MULTILINE)
    assert heads[:4] == ["Verdict", "The strongest attacks", "Figures behind the verdict",
                         "Accuracy"]
    verdict = json.loads((audited / "verdict.json").read_text())
    (d,) = verdict["defenses"]
    assert verdict["baseline"] == "ce" and d["defense"] == "crl"
    assert d["sentence"].split(": ", 1)[1].rsplit(": ", 1)[0] in md
    assert "![roc roc_crl](figures/roc_crl.png)" in md.split("## Accuracy")[0]
    for head in heads[1:]:          # every section says what it measures before its table
        body = md.split(f"## {head}\n", 1)[1].lstrip("\n")
        assert not body.startswith(("|", "![")), head
    assert isinstance(json.loads((audited / "results.json").read_text()), list)


def test_a_one_seed_report_quotes_the_intervals_results_json_holds(audited):
    """With one seed per defense, the report's attack tables show the run's own bootstrap
    interval (results.json), not a second draw whose endpoints differ in the last digit."""
    from crl.report.cells import metric_cell
    from crl.report.tables import METRICS

    md = (audited / "report.md").read_text()
    rows = {}
    for metric in ("auc", "tpr_at_1pct_fpr"):
        for line in md.split(f"## {METRICS[metric]}", 1)[1].split("\n## ", 1)[0].splitlines():
            if line.startswith(("| ce |", "| crl |")):
                rows.setdefault((metric, line.split("|")[1].strip()), []).append(line)
    checked = 0
    for target in json.loads((audited / "results.json").read_text()):
        for attack, m in target["attacks"].items():
            for metric in ("auc", "tpr_at_1pct_fpr"):
                if m.get(f"{metric}_ci"):
                    cell = f"| {metric_cell(m, metric)} |"
                    assert any(cell in r for r in rows[(metric, target["defense"])]), (
                        attack, metric, cell)
                    checked += 1
    assert checked >= 10


def test_the_audit_writes_report_html_with_its_tables_figures_config_and_version(audited):
    page = (audited / "report.html").read_text()
    md = (audited / "report.md").read_text()
    tags = _Tags(page)
    md_tables = len(re.findall(r"^\|?\s*-{3,}.*\|\s*$", md, re.MULTILINE))
    assert md_tables >= 3
    rankings = sum(p.read_text().startswith("attack,rank,sample_index,label,score\n")
                   for p in (audited / "vulnerability").glob("*.csv"))
    assert len(tags.all("table")) == md_tables + rankings
    md_images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    pngs = sorted((audited / "vulnerability").glob("*.png"))
    embedded = [base64.b64decode(a["src"].split(",", 1)[1]) for a in tags.all("img")]
    assert embedded[:len(md_images)] == [(audited / s).read_bytes() for s in md_images]
    assert embedded[len(md_images):] == [p.read_bytes() for p in pngs]
    text = "".join(tags.text)
    assert (audited / "config.yaml").read_text() in text
    assert (audited / "version.json").read_text() in text
    for line in md.splitlines():       # every table cell's text is on the page
        if line.startswith("|") and "---" not in line:
            for cell in line.strip("|").split("|"):
                assert cell.strip().replace("`", "").replace("**", "") in text
    _no_network(page)


def _browser() -> str | None:
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def _chromium(browser: str, tmp: Path, *args: str) -> str:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--hide-scrollbars", f"--user-data-dir={tmp / 'profile'}", *args]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(tmp)})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


PROBE = """<script>
window.addEventListener("load", function () {
  var imgs = Array.from(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  var root = document.documentElement;
  document.body.dataset.decoded = ok.length + "/" + imgs.length;
  document.body.dataset.overflow = String(root.scrollWidth > root.clientWidth);
  document.body.dataset.width = String(root.clientWidth);
});
</script></body>"""

PHONE = """<!DOCTYPE html><html><body>
<iframe id="f" src="probe.html" style="width:390px;height:844px;border:0"></iframe>
<script>
window.addEventListener("load", function () {
  var b = document.getElementById("f").contentDocument.body;
  document.body.dataset.probe = [b.dataset.decoded, b.dataset.overflow, b.dataset.width].join(";");
});
</script></body></html>"""


def _not_blank(png: Path, width: int) -> None:
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] == width
        gray = np.asarray(im.convert("L"), dtype=np.float64)
    assert gray.std() > 20 and (gray < 128).mean() > 0.01     # text and figures, not blank


def test_report_html_renders_in_a_real_headless_browser(audited, tmp_path):
    """Every table and every image is in the rendered DOM, every image decoded, and the page
    fits a laptop (1280 px) and a phone (390 px) without scrolling sideways."""
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium/chrome found (CI installs Debian's chromium with apt-get; "
                    "install it to run this browser test)")
    page = (audited / "report.html").read_text()
    n_tables, n_images = len(_Tags(page).all("table")), len(_Tags(page).all("img"))
    assert n_images >= 2
    (tmp_path / "probe.html").write_text(page.replace("</body>", PROBE))
    (tmp_path / "phone.html").write_text(PHONE)
    dom = _chromium(browser, tmp_path, "--window-size=1280,900", "--dump-dom",
                    (tmp_path / "probe.html").as_uri())
    rendered = _Tags(dom)
    assert len(rendered.all("table")) == n_tables and len(rendered.all("img")) == n_images
    body = rendered.all("body")[0]
    assert body["data-decoded"] == f"{n_images}/{n_images}"
    assert (body["data-overflow"], body["data-width"]) == ("false", "1280")
    dom = _chromium(browser, tmp_path, "--allow-file-access-from-files", "--window-size=900,900",
                    "--dump-dom", (tmp_path / "phone.html").as_uri())
    assert _Tags(dom).all("body")[0]["data-probe"] == f"{n_images}/{n_images};false;390"
    for width in (1280, 390):
        shot = tmp_path / f"report-{width}.png"
        _chromium(browser, tmp_path, f"--window-size={width},2400", f"--screenshot={shot}",
                  (audited / "report.html").as_uri())
        _not_blank(shot, width)


def test_crl_report_rebuilds_the_report_without_training(audited, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(audited, run)
    before = {p: (run / p).read_bytes() for p in ("report.md", "report.html", "verdict.json",
                                                   "figures/roc.png", "figures/margins.png",
                                                   "figures/roc_crl.png")}
    for p in ("report.md", "report.html", "verdict.json"):
        (run / p).unlink()
    shutil.rmtree(run / "figures")
    shutil.rmtree(run / "vulnerability")

    def no_training(*args, **kwargs):
        raise AssertionError("crl report trained a model")

    monkeypatch.setattr("crl.engine.fit.fit", no_training)
    monkeypatch.setattr("crl.engine.sequential.fit", no_training)
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "| ce |" in out and "Verdict: each defense vs ce" in out and "\n  crl: " in out
    for p, data in before.items():
        assert (run / p).read_bytes() == data, p
    assert sorted(p.name for p in (run / "vulnerability").iterdir()) == \
        sorted(p.name for p in (audited / "vulnerability").iterdir())


def test_crl_report_refuses_what_is_not_a_finished_run(audited, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(audited, unfinished)
    (unfinished / "scores" / "crl_seed0.npz").unlink()
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "config.yaml").write_text("defense: crl\n")
    (trained / "scores").mkdir()
    cases = {tmp_path / "missing": "no such directory", tmp_path / "file": "not a directory",
             tmp_path / "empty": "it has no config.yaml",
             unfinished: "1 of 2 score files missing, e.g. scores/crl_seed0.npz",
             trained: "its config.yaml is not an audit's"}
    for run, why in cases.items():
        capsys.readouterr()
        assert main(["report", str(run)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"crl: error: report.run = '{run}': expected a finished crl audit "
                              "run directory") and why in err, err
        assert len(err.strip().splitlines()) == 1
    assert list((tmp_path / "empty").iterdir()) == []         # nothing written, not even a lock


LAYOUT = """<script>
function layoutFacts() {
  var main = document.querySelector("main"), wide = [], fonts = [];
  var tables = Array.from(document.querySelectorAll("main > .table > table"));
  tables.forEach(function (t, i) {
    var box = t.parentElement;
    if (t.getBoundingClientRect().width > box.clientWidth + 1 ||
        box.getBoundingClientRect().width > main.clientWidth + 1) { wide.push(i); }
    t.querySelectorAll("td").forEach(function (td) {
      fonts.push(parseFloat(getComputedStyle(td).fontSize)); });
  });
  var verdict = document.querySelector("h2#verdict + ul");
  var figs = Array.from(document.querySelectorAll("main > figure img")).map(function (im) {
    return [im.alt, im.clientWidth, im.naturalWidth]; });
  return JSON.stringify({tables: tables.length, wide: wide, font: Math.min.apply(null, fonts),
    verdict: verdict ? verdict.getBoundingClientRect().bottom : null,
    height: window.innerHeight, width: document.documentElement.clientWidth,
    overflow: document.documentElement.scrollWidth > document.documentElement.clientWidth,
    figures: figs});
}
window.addEventListener("load", function () { document.body.dataset.facts = layoutFacts(); });
</script></body>"""

FRAME = """<!DOCTYPE html><html><body style="margin:0">
<iframe id="f" src="layout.html" style="width:{w}px;height:{h}px;border:0"></iframe>
<script>
window.addEventListener("load", function () {{
  document.body.dataset.facts = document.getElementById("f").contentDocument.body.dataset.facts;
}});
</script></body></html>"""


def _layout(browser: str, tmp: Path, width: int, height: int) -> dict:
    """The layout facts of the report (LAYOUT's probe) in a width x height viewport."""
    (tmp / "frame.html").write_text(FRAME.format(w=width, h=height))
    dom = _chromium(browser, tmp, "--allow-file-access-from-files", "--window-size=1400,1000",
                    "--dump-dom", (tmp / "frame.html").as_uri())
    return json.loads(_Tags(dom).all("body")[0]["data-facts"])


def test_the_verdict_and_its_tables_read_on_a_laptop_and_a_phone(audited, tmp_path):
    """At 1280x800 and 390x844: no table of the report body is wider than its box (none
    scrolls sideways, which is how wide tables hid attacks), the verdict lies in the first
    viewport, table text is at least 12 px and figure text at least 10 px as rendered."""
    from crl.report.plots import DPI, FONT_PT

    browser = _browser()
    if browser is None:
        pytest.skip("no chromium/chrome found (CI installs Debian's chromium with apt-get; "
                    "install it to run this browser test)")
    page = (audited / "report.html").read_text()
    (tmp_path / "layout.html").write_text(page.replace("</body>", LAYOUT))
    for width, height in ((1280, 800), (390, 844)):
        facts = _layout(browser, tmp_path, width, height)
        assert (facts["width"], facts["height"], facts["overflow"]) == (width, height, False)
        assert facts["tables"] >= 5 and facts["wide"] == [], (width, facts)
        assert facts["font"] >= 12, (width, facts["font"])
        assert facts["verdict"] is not None and 0 < facts["verdict"] <= height, (width, facts)
        figures = [f for f in facts["figures"] if f[0].startswith(("roc", "margins"))]
        assert len(figures) >= 3
        for alt, shown, natural in figures:
            assert FONT_PT * DPI / 72 * shown / natural >= 10, (width, alt, shown, natural)
