"""The run report: one self-contained HTML file (inline CSS and SVG, no script, no network).

Charts share the step axis: train/eval loss, perplexity, learning rate, grad norm, tokens/s,
MFU, memory, GPU utilisation/power and skipped steps, each run in its own colour, with its
checkpoints, resumes and stops drawn as vertical lines. Below them: each run's status and
summary, and the resolved config as one table, rows that differ between runs highlighted.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any

from tunesmith.hf.files import write_text_atomic
from tunesmith.observe.report.load import RunData
from tunesmith.observe.report.svg import Chart, Marker, Series, fmt, render

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
MARKER_COLORS = {"checkpoint": "#7f7f7f", "resume": "#2ca02c", "stop": "#ff7f0e", "error": "#d62728"}

# (chart id, title, [(record key, series suffix, dash)]) drawn from train records.
TRAIN_CHARTS = (
    ("lr", "Learning rate", [("lr", "lr", "")]),
    ("grad_norm", "Grad norm (before clipping)", [("grad_norm", "grad norm", "")]),
    ("tokens_per_s", "Train tokens/s (training steps only)",
     [("tokens_per_s_window", "tokens/s (window)", ""), ("tokens_per_s", "tokens/s (run average)", "5 3")]),
    ("mfu", "MFU", [("mfu_window", "MFU (window)", ""), ("mfu", "MFU (run average)", "5 3")]),
    ("memory", "GPU memory, GiB", [("mem_alloc_peak_gib", "allocated peak (window)", ""),
                                   ("mem_reserved_peak_gib", "reserved peak (window)", "5 3")]),
    ("gpu", "GPU utilisation % and power W", [("gpu_util_pct", "utilisation %", ""),
                                              ("gpu_power_w", "power W", "5 3")]),
    ("skipped", "Skipped steps (non-finite, cumulative)", [("skipped_steps", "skipped steps", "")]),
)


def _points(records: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    out = []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append((float(r["step"]), float(v)))
    return out


def _markers(run: RunData, color: str) -> list[Marker]:
    out = []
    for e in run.events:
        kind = e.get("event")
        if kind in MARKER_COLORS and isinstance(e.get("step"), int) and e["step"] >= 0:
            label = f"{run.label}: {kind} at step {e['step']}"
            out.append(Marker(float(e["step"]), label, MARKER_COLORS[kind], kind))
    return out


def build_charts(runs: list[RunData]) -> list[Chart]:
    """Every chart that has data in at least one run (the others are named in a note)."""
    many = len(runs) > 1
    name = (lambda run, s: f"{run.label}: {s}") if many else (lambda run, s: s)
    loss = Chart("loss", "Loss (train, eval)")
    ppl = Chart("perplexity", "Perplexity (eval; train = exp(train loss))")
    charts = [loss, ppl] + [Chart(cid, title) for cid, title, _ in TRAIN_CHARTS]
    for i, run in enumerate(runs):
        color = COLORS[i % len(COLORS)]
        marks = _markers(run, color)
        loss.series += [Series(name(run, "train loss"), _points(run.train, "loss"), color),
                        Series(name(run, "eval loss"), _points(run.evals, "eval_loss"), color, "5 3", dots=True)]
        train_ppl = [(x, math.exp(y)) for x, y in _points(run.train, "loss") if y < 30]
        ppl.series += [Series(name(run, "eval perplexity"), _points(run.evals, "perplexity"), color, "5 3", dots=True),
                       Series(name(run, "train perplexity"), train_ppl, color)]
        for chart, (_, _, keys) in zip(charts[2:], TRAIN_CHARTS):
            chart.series += [Series(name(run, label), _points(run.train, key), color, dash)
                             for key, label, dash in keys]
        for chart in charts:
            chart.markers += marks
    return [c for c in charts if any(s.points for s in c.series)]


def _legend(chart: Chart) -> str:
    items = []
    for s in chart.series:
        if not s.points:
            continue
        line = f'<svg width="26" height="10"><line x1="0" y1="5" x2="26" y2="5" stroke="{s.color}" ' \
               f'stroke-width="2.5"{f" stroke-dasharray={chr(34)}{s.dash}{chr(34)}" if s.dash else ""}/></svg>'
        last = s.points[-1][1]
        items.append(f'<li data-series="{escape(s.name)}">{line} {escape(s.name)} '
                     f'<span class="last">last {fmt(last)}</span></li>')
    kinds = sorted({m.kind for m in chart.markers})
    for k in kinds:
        items.append(f'<li class="mk"><svg width="12" height="12"><line x1="6" y1="0" x2="6" y2="12" '
                     f'stroke="{MARKER_COLORS[k]}" stroke-width="2" stroke-dasharray="3 2"/></svg> {k}</li>')
    return '<ul class="legend">' + "".join(items) + "</ul>"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return escape(f"{v:.6g}")
    return escape(v if isinstance(v, str) else json.dumps(v))


def _table(runs: list[RunData], rows: list[dict[str, Any]], cls: str, mark_diffs: bool) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{escape(r.label)}</th>" for r in runs)
    body = []
    for k in keys:
        vals = [r.get(k, "—") for r in rows]
        differs = mark_diffs and len({json.dumps(v, sort_keys=True, default=str) for v in vals}) > 1
        body.append(f'<tr class="{"diff" if differs else "same"}"><td class="key">{escape(k)}</td>'
                    + "".join(f"<td>{_cell(v)}</td>" for v in vals) + "</tr>")
    return f'<table class="{cls}"><tr><th>key</th>{head}</tr>{"".join(body)}</table>'


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.runs td,.runs th,table td,table th{padding:3px 10px;border-bottom:1px solid #e4e4e4;text-align:left;vertical-align:top}
table{border-collapse:collapse;background:#fff;font-size:13px}td.key{font-family:ui-monospace,monospace}
.grid-charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(460px,1fr));gap:16px}
.card{background:#fff;border:1px solid #e2e2e2;border-radius:6px;padding:10px 12px}
.card h3{font-size:14px;margin:0 0 6px}svg.chart{width:100%;height:auto;display:block}
svg .plot{fill:#fff;stroke:#ccc}svg .grid{stroke:#eee}svg .tick{font-size:10px;fill:#666}
svg .axis{font-size:11px;fill:#444}svg .line{fill:none;stroke-width:1.8}
svg .marker{stroke-width:1.2;stroke-dasharray:3 3;opacity:.8}
.legend{list-style:none;padding:0;margin:6px 0 0;font-size:12px;display:flex;flex-wrap:wrap;gap:4px 14px}
.legend .last{color:#888}.note{color:#666;font-size:13px}
tr.diff td{background:#fff3c4}#only-diff:checked~table tr.same{display:none}
.swatch{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:6px;vertical-align:-1px}
"""


def render_report(runs: list[RunData]) -> str:
    charts = build_charts(runs)
    drawn = {c.id for c in charts}
    missing = [title for cid, title in [("mfu", "MFU (needs a known GPU peak)"),
                                        ("memory", "GPU memory"), ("gpu", "GPU utilisation/power (NVML)")]
               if cid not in drawn]
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>tunesmith report: "
             f"{escape(', '.join(r.label for r in runs))}</title><style>{CSS}</style></head><body>",
             f"<h1>tunesmith run report</h1><p class=\"note\">Generated {now}.</p>", "<h2>Runs</h2>",
             '<table class="runs"><tr><th>run</th><th>status</th><th>directory</th><th>last update</th></tr>']
    for i, r in enumerate(runs):
        parts.append(f'<tr><td><span class="swatch" style="background:{COLORS[i % len(COLORS)]}"></span>'
                     f"{escape(r.label)}</td><td>{escape(r.status)}</td><td>{escape(str(r.path))}</td>"
                     f"<td>{escape(r.updated)}</td></tr>")
    parts.append("</table><h2>Training curves</h2>")
    if missing:
        parts.append(f'<p class="note">Not recorded in {"these runs" if len(runs) > 1 else "this run"}: '
                     f'{escape(", ".join(missing))}.</p>')
    parts.append('<div class="grid-charts">')
    for c in charts:
        parts.append(f'<div class="card" data-chart="{c.id}"><h3>{escape(c.title)}</h3>{render(c)}{_legend(c)}</div>')
    parts.append("</div><h2>Summary</h2>")
    summaries = [_flatten(r.summary) if r.summary else {"status": r.status} for r in runs]
    parts.append(_table(runs, summaries, "summary", mark_diffs=False))
    many = len(runs) > 1
    # One run: folded (it is long); several: open, the keys that differ highlighted.
    parts.append(f'<h2>Resolved config</h2><details{" open" if many else ""}><summary>'
                 f'{"all keys; rows that differ between runs are highlighted" if many else "show"}</summary>')
    if many:
        parts.append('<input type="checkbox" id="only-diff"> <label for="only-diff">show only the keys that '
                     'differ</label>')
    parts.append(_table(runs, [_flatten(r.config) for r in runs], "config", mark_diffs=many))
    parts.append("</details></body></html>\n")
    return "".join(parts)


def write_report(run_dirs: list[Path], out: Path, live_summary: dict[str, Any] | None = None) -> Path:
    """Write the report for `run_dirs` to `out` (atomically); returns `out`."""
    from tunesmith.observe.report.load import load_runs

    runs = load_runs([Path(p) for p in run_dirs], live_summary)
    text = render_report(runs)
    return write_text_atomic(out, text, "--out", "report.html")
