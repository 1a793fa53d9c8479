"""The HTML run report (`OUTPUT/report.html`, `tunesmith report RUN_DIR ... --out FILE`)."""

from tunesmith.observe.report.html import render_report, write_report
from tunesmith.observe.report.load import RunData, load_run, load_runs

__all__ = ["RunData", "load_run", "load_runs", "render_report", "write_report"]
