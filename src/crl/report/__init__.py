"""Tables and figures of an audit run: report.md (tables.py), report.html rendered from it
(html.py), and the report rebuilt from a finished run without training (rebuild.py)."""
from crl.report.html import markdown_to_html, write_html
from crl.report.rebuild import load_run, rebuild_report
from crl.report.tables import format_table, write_report

__all__ = ["format_table", "load_run", "markdown_to_html", "rebuild_report", "write_html",
           "write_report"]
