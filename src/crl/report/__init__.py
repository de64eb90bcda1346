"""Tables and figures of an audit run."""
from crl.report.tables import format_table, write_report

__all__ = ["format_table", "write_report"]
