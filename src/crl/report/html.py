"""report.html: the finished report.md as one self-contained page.

The page is rendered FROM report.md (whatever the report's writers put there appears here too)
by a converter for the Markdown subset report.md uses: headings, paragraphs, pipe tables,
images, blockquotes, lists, fenced code, inline code and bold; anything else stays visible as
plain text. Every figure is embedded as a base64 data URI, and the page carries its own CSS: no
network references at all (no external stylesheets, scripts, fonts or images), so it opens
offline, from an e-mail attachment, anywhere. Collapsible sections add the most exposed
training samples (vulnerability/*.csv), the resolved config (config.yaml) and the code version
(version.json) where the run holds them. The layout fits a laptop and a phone: text reflows,
figures shrink to the width (never grow past their natural size, so their text stays legible),
and on a phone each table row becomes a card of "column: value" lines; report.md splits wide
tables per attack family so that a laptop needs no sideways scrolling.
"""
from __future__ import annotations

import base64
import csv
import html
import re
from collections.abc import Callable
from pathlib import Path

from crl.core.errors import CRLError
from crl.core.utils import write_text_atomic

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
               ".gif": "image/gif", ".svg": "image/svg+xml", ".webp": "image/webp"}
TOP_SAMPLES = 10      # most exposed samples shown per attack and target
RANKING_COLUMNS = ("attack", "rank", "sample_index", "label", "score")

_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_CODE = re.compile(r"(`+)(.+?)\1")
_HEADING = re.compile(r"(#{1,6})\s+(.*?)\s*#*\s*$")
_RULE = re.compile(r"\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?")
_ITEM = re.compile(r"[-*+]\s+(.*)")

ImageSource = Callable[[str], str]


# --------------------------------------------------------------------------- inline

def _inline_text(text: str, image: ImageSource) -> str:
    """Escaped text with images and bold (code spans are stashed by `inline`)."""
    out, pos = [], 0
    for m in _IMAGE.finditer(text):
        out.append(_BOLD.sub(r"<strong>\1</strong>", html.escape(text[pos:m.start()])))
        out.append(f'<img src="{image(m.group(2))}" alt="{html.escape(m.group(1))}">')
        pos = m.end()
    out.append(_BOLD.sub(r"<strong>\1</strong>", html.escape(text[pos:])))
    return "".join(out)


def inline(text: str, image: ImageSource) -> str:
    """One line of Markdown as HTML: code spans, images, bold; everything else escaped."""
    codes: list[str] = []

    def stash(m: re.Match) -> str:
        codes.append(f"<code>{html.escape(m.group(2).strip())}</code>")
        return f"\x00{len(codes) - 1}\x00"

    out = _inline_text(_CODE.sub(stash, text.replace("\x00", "")), image)
    return re.sub("\x00(\\d+)\x00", lambda m: codes[int(m.group(1))], out)


# --------------------------------------------------------------------------- blocks

def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().removeprefix("|").removesuffix("|").split("|")]


def _label(cell_html: str) -> str:
    """A header cell's HTML as the plain text of a data-label attribute."""
    return html.escape(html.unescape(re.sub(r"<[^>]+>", "", cell_html)), quote=True)


def _table(lines: list[str], image: ImageSource) -> str:
    """A pipe table (header, rule, rows); on a phone each row becomes a card of label: value
    lines (the CSS reads each cell's data-label, its column's header)."""
    heads = [inline(c, image) for c in _cells(lines[0])]
    head = "".join(f'<th scope="col">{h}</th>' for h in heads)
    rows = []
    for line in lines[2:]:
        cells = [f'<td data-label="{_label(h)}">{inline(c, image)}</td>'
                 for h, c in zip(heads + [""] * len(_cells(line)), _cells(line))]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (f'<div class="table"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def _slug(text: str, used: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "section"
    slug, n = base, 1
    while slug in used:
        n += 1
        slug = f"{base}-{n}"
    used.add(slug)
    return slug


def _take(lines: list[str], i: int, keep: Callable[[str], bool]) -> tuple[list[str], int]:
    """The run of lines from i on that `keep` accepts, and the index after it."""
    j = i
    while j < len(lines) and keep(lines[j]):
        j += 1
    return lines[i:j], j


def _block(lines: list[str], i: int, image: ImageSource, used: set[str]) -> tuple[str, int]:
    """The HTML of the block starting at line i (not blank), and the index after it."""
    line = lines[i].strip()
    if m := _HEADING.fullmatch(line):
        level, text = len(m.group(1)), m.group(2)
        return f'<h{level} id="{_slug(text, used)}">{inline(text, image)}</h{level}>', i + 1
    if line.startswith("```"):
        body, j = _take(lines, i + 1, lambda s: not s.strip().startswith("```"))
        return f"<pre><code>{html.escape(chr(10).join(body))}</code></pre>", j + 1
    if line.startswith("|") and i + 1 < len(lines) and _RULE.fullmatch(lines[i + 1].strip()):
        rows, j = _take(lines, i, lambda s: s.strip().startswith("|"))
        return _table(rows, image), j
    if line.startswith(">"):
        quoted, j = _take(lines, i, lambda s: s.strip().startswith(">"))
        inner = [re.sub(r"^\s*>\s?", "", s) for s in quoted]
        cls = ' class="warning"' if "WARNING" in " ".join(inner) else ""
        inside = markdown_to_html("\n".join(inner), image, used)
        return f"<blockquote{cls}>{inside}</blockquote>", j
    if _ITEM.fullmatch(line):
        items, j = _take(lines, i, lambda s: _ITEM.fullmatch(s.strip()) is not None)
        lis = "".join(f"<li>{inline(_ITEM.fullmatch(s.strip()).group(1), image)}</li>"
                      for s in items)
        return f"<ul>{lis}</ul>", j
    if _IMAGE.fullmatch(line):
        return f"<figure>{inline(line, image)}</figure>", i + 1
    para, j = _take(lines, i, lambda s: bool(s.strip()) and not _starts_block(s))
    para, j = (para, j) if para else ([line], i + 1)
    return f"<p>{inline(' '.join(s.strip() for s in para), image)}</p>", j


def _starts_block(line: str) -> bool:
    s = line.strip()
    return bool(_HEADING.fullmatch(s) or s.startswith(("```", "|", ">"))
                or _ITEM.fullmatch(s) or _IMAGE.fullmatch(s))


def markdown_to_html(text: str, image: ImageSource, used: set[str] | None = None) -> str:
    """report.md's Markdown subset as HTML; `image(src)` gives each image's URL."""
    lines, used = text.splitlines(), set() if used is None else used
    out, i = [], 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        block, i = _block(lines, i, image, used)
        out.append(block)
    return "\n".join(out)


# --------------------------------------------------------------------------- the run's files

def data_uri(root: Path, src: str) -> str:
    """The file `src` (relative to root, inside it) as a base64 data URI."""
    where = f"report image = {src!r}"
    if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", src) or src.startswith(("/", "\\")):
        raise CRLError(f"{where}: expected a relative path to a figure in the run directory")
    path = (root / src).resolve()
    if not path.is_relative_to(root.resolve()) or not path.is_file():
        raise CRLError(f"{where}: expected a file under {root} (none there)")
    kind = IMAGE_TYPES.get(path.suffix.lower())
    if kind is None:
        raise CRLError(f"{where}: expected one of {', '.join(sorted(IMAGE_TYPES))}")
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _details(title: str, body: str, open_: bool = False) -> str:
    return (f'<details{" open" if open_ else ""}><summary>{html.escape(title)}</summary>'
            f"{body}</details>")


def _ranking(path: Path) -> list[dict[str, str]] | None:
    """The rows of a per-attack ranking CSV (crl.report.vulnerability) up to TOP_SAMPLES, or
    None for another kind of CSV."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != RANKING_COLUMNS:
            return None
        return [r for r in reader if int(r["rank"]) <= TOP_SAMPLES]


def _exposed_table(rows: list[dict[str, str]]) -> str:
    """Rank by attack: the TOP_SAMPLES highest-scored members of one target."""
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    by = {(r["attack"], int(r["rank"])): r for r in rows}
    head = "".join(f"<th>{html.escape(a)}</th>" for a in attacks)
    body = []
    for rank in range(1, 1 + max((int(r["rank"]) for r in rows), default=0)):
        cells = [f"<td>{rank}</td>"]
        for a in attacks:
            r = by.get((a, rank))
            cells.append("<td></td>" if r is None else
                         f'<td>#{html.escape(r["sample_index"])} '
                         f'<span class="muted">class {html.escape(r["label"])}</span></td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (f'<div class="table"><table><thead><tr><th>Rank</th>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _exposed(root: Path) -> str:
    """vulnerability/'s figures and per-attack rankings ('' when it holds neither)."""
    folder = root / "vulnerability"
    figures = "".join(f'<figure><img src="{data_uri(root, p.relative_to(root).as_posix())}" '
                      f'alt="{html.escape(p.stem)}"><figcaption>{html.escape(p.name)}'
                      "</figcaption></figure>" for p in sorted(folder.glob("*.png")))
    rankings = [(p, _ranking(p)) for p in sorted(folder.glob("*.csv"))]
    tables = "".join(f"<h3>{html.escape(p.stem)}</h3>{_exposed_table(rows)}"
                     for p, rows in rankings if rows)
    if not figures and not tables:
        return ""
    figures = f'<div class="gallery">{figures}</div>' if figures else ""
    note = ("<p>Training samples (dataset index and class) ranked by each attack's score, top "
            f"{TOP_SAMPLES} per attack; every file is in <code>vulnerability/</code>.</p>")
    return _details("Most exposed training samples", figures + (note if tables else "") + tables)


def appendix(root: Path) -> str:
    """Collapsible sections from the run's vulnerability/, config.yaml and version.json."""
    parts = [_exposed(root)] if (root / "vulnerability").is_dir() else []
    for name, title in (("config.yaml", "Resolved configuration"),
                        ("version.json", "Code version")):
        if (root / name).is_file():
            text = html.escape((root / name).read_text())
            parts.append(_details(f"{title} ({name})", f"<pre><code>{text}</code></pre>"))
    return "\n".join(p for p in parts if p)


def render_page(root: Path, markdown: str) -> str:
    """The whole page for the run directory `root` and its report.md text."""
    body = markdown_to_html(markdown, lambda src: data_uri(root, src))
    m = re.search(r"<h1[^>]*>(.*?)</h1>", body)
    title = re.sub(r"<[^>]+>", "", m.group(1)) if m else "crl report"
    return _PAGE.format(title=title, css=_CSS, body=body, appendix=appendix(root))


def write_html(root: str | Path) -> Path:
    """root/report.html from root/report.md and the files beside it (written atomically)."""
    root = Path(root)
    page = render_page(root, (root / "report.md").read_text())
    write_text_atomic(root / "report.html", page)
    return root / "report.html"


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<main>
{body}
{appendix}
<footer>Rendered by crl from report.md; self-contained (figures embedded, no network).</footer>
</main>
</body>
</html>
"""

_CSS = """
:root { color-scheme: light dark; --fg: #1c2330; --muted: #5d6876; --bg: #ffffff;
  --panel: #f4f6f9; --line: #d8dde4; --accent: #2357a8; --warn: #b45309; --warn-bg: #fff6e8; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e4e8ee; --muted: #9aa5b3; --bg: #15181d; --panel: #1e232b; --line: #343b46;
    --accent: #86adff; --warn: #f0a94a; --warn-bg: #33260f; } }
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 16px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
    sans-serif; }
main { max-width: 84rem; margin: 0 auto; padding: 2rem 1.5rem 3rem; }
h1 { font-size: 1.75rem; line-height: 1.25; margin: 0 0 1rem; }
h2 { font-size: 1.2rem; line-height: 1.3; margin: 2.2rem 0 .8rem; padding-bottom: .35rem;
  border-bottom: 1px solid var(--line); }
h3 { font-size: 1rem; margin: 1.4rem 0 .5rem; }
p, li { max-width: 60rem; }
p { margin: .7rem 0; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .88em;
  background: var(--panel); padding: .08em .32em; border-radius: 4px; }
pre { background: var(--panel); border: 1px solid var(--line); border-radius: 6px;
  padding: .8rem 1rem; overflow-x: auto; font-size: .85rem; line-height: 1.45; }
pre code { background: none; padding: 0; font-size: inherit; }
.table { width: fit-content; max-width: 100%; overflow-x: auto; margin: .8rem 0 1.4rem;
  border: 1px solid var(--line); border-radius: 8px; -webkit-overflow-scrolling: touch; }
table { border-collapse: collapse; font-size: .9rem; font-variant-numeric: tabular-nums; }
th, td { padding: .45rem .9rem; text-align: right; white-space: nowrap;
  border-bottom: 1px solid var(--line); }
thead th { background: var(--panel); font-weight: 600; }
tbody tr:last-child td { border-bottom: 0; }
tbody tr:nth-child(even) td { background: color-mix(in srgb, var(--panel) 55%, var(--bg)); }
th:first-child, td:first-child { position: sticky; left: 0; background: var(--bg);
  text-align: left; font-weight: 600; box-shadow: inset -1px 0 0 var(--line); }
thead th:first-child { background: var(--panel); }
figure { margin: 1.2rem 1rem 1.2rem 0; display: inline-block; vertical-align: top;
  max-width: 100%; }
h2#verdict + ul { list-style: none; padding: .6rem 1rem; margin: .8rem 0;
  border-left: 4px solid var(--accent); background: var(--panel); border-radius: 0 8px 8px 0; }
h2#verdict + ul li { margin: .3rem 0; max-width: none; }
.gallery { display: grid; gap: 1rem; margin: 1rem 0;
  grid-template-columns: repeat(auto-fill, minmax(min(22rem, 100%), 1fr)); }
.gallery figure { margin: 0; }
img { display: block; max-width: 100%; height: auto; background: #fff;
  border: 1px solid var(--line); border-radius: 8px; }
figcaption { color: var(--muted); font-size: .85rem; margin-top: .35rem; }
blockquote { margin: 1rem 0; padding: .2rem 1rem; border-left: 4px solid var(--accent);
  background: var(--panel); border-radius: 0 8px 8px 0; }
blockquote.warning { border-left-color: var(--warn); background: var(--warn-bg); }
details { margin: .8rem 0; border: 1px solid var(--line); border-radius: 8px;
  padding: .55rem 1rem; }
details[open] { padding-bottom: .9rem; }
summary { cursor: pointer; font-weight: 600; }
.muted, footer { color: var(--muted); }
footer { margin-top: 2.5rem; font-size: .85rem; }
@media (max-width: 640px) {
  body { font-size: 15px; }
  main { padding: 1.1rem .8rem 2rem; }
  h1 { font-size: 1.35rem; }
  h2 { font-size: 1.08rem; }
  .table { width: 100%; border: 0; overflow: visible; }
  .table table, .table tbody, .table tr, .table td { display: block; width: 100%; }
  .table thead { display: none; }
  .table tr { border: 1px solid var(--line); border-radius: 8px; margin: 0 0 .6rem;
    padding: .2rem 0; }
  .table td, .table td:first-child { display: flex; justify-content: space-between; gap: .8rem;
    position: static; box-shadow: none; background: none; white-space: normal;
    text-align: right; padding: .28rem .7rem; }
  .table td:first-child { background: var(--panel); }
  .table tbody tr:nth-child(even) td { background: none; }
  .table td::before { content: attr(data-label); font-weight: 600; text-align: left;
    color: var(--muted); }
  .table td[data-label=""]::before { content: none; }
  table { font-size: .9rem; }
}
"""
