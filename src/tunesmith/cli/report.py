"""`tunesmith report RUN_DIR [RUN_DIR ...] --out report.html`: one HTML page for any runs.

Works on finished, running and interrupted runs (it reads what they have written so far);
several runs are overlaid in one set of charts, and their configs compared.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _report(args: argparse.Namespace) -> int:
    from tunesmith.observe.report import write_report

    out = write_report([Path(d) for d in args.run_dirs], Path(args.out))
    print(json.dumps({"report": str(out), "runs": len(args.run_dirs)}))
    return 0


def add_report_command(sub) -> None:
    r = sub.add_parser("report", help="HTML report (charts, config diff, summary) of one or more runs")
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output.dir of a run (finished, running or interrupted)")
    r.add_argument("--out", default="report.html", help="HTML file to write (default: report.html)")
    r.set_defaults(func=_report)
