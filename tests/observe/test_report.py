"""The report from run files alone: running/interrupted runs, several runs, config differences."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser

import pytest

from tests.observe.helpers import tiny_run_args
from tunesmith.cli.main import run
from tunesmith.observe.report import load_run, render_report


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.series: list[str] = []
        self.diff_rows: list[str] = []
        self._in_diff = False
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "path" and "data-series" in a:
            self.series.append(a["data-series"])
        self._in_diff = tag == "tr" and a.get("class") == "diff" or (self._in_diff and tag == "td")
        if tag == "td" and a.get("class") == "key" and self._in_diff:
            self._take = True

    def handle_data(self, data):
        if getattr(self, "_take", False):
            self.diff_rows.append(data)
            self._take = False


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_tokenizer_dir, demo_text):
    root = tmp_path_factory.mktemp("report")
    train, valid = demo_text
    for name, lr in (("a", "3e-3"), ("b", "1e-3")):
        args = tiny_run_args(tiny_tokenizer_dir, root / name, train, valid, **{
            "train.max_steps": 4, "optim.lr": lr, "eval.every_steps": 2, "checkpoint.every_steps": 2})
        assert run(args) == 0
    return root / "a", root / "b"


def test_end_of_run_report_and_comparison(two_runs, tmp_path, capsys):
    a, b = two_runs
    assert (a / "report.html").is_file()  # written at the end of every run
    summary = json.loads((a / "summary.json").read_text())
    assert summary["report_s"] > 0 and "tracker_s" in summary
    out = tmp_path / "cmp.html"
    assert run(["report", str(a), str(b), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["report"] == str(out)
    html = out.read_text()
    p = _Collect()
    p.feed(html)
    assert {"a: train loss", "b: train loss", "a: eval loss", "b: eval perplexity", "a: lr",
            "b: tokens/s (window)", "a: grad norm"} <= set(p.series)
    assert p.diff_rows == ["optim.lr", "output.dir"]  # the only config keys that differ
    assert "script" not in p.tags and "http://" not in html.replace("http://www.w3.org/2000/svg", "")


def test_running_and_interrupted_runs(two_runs, tmp_path):
    a, _ = two_runs
    live = tmp_path / "live"
    shutil.copytree(a, live, ignore=shutil.ignore_patterns("checkpoints", "final"))
    (live / "summary.json").unlink()
    with open(live / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 4.1')  # a record being written
    runs = load_run(live)
    assert runs.status.startswith("running or stopped without a summary (last record: step 4)")
    assert "running or stopped" in render_report([runs])

    stopped = json.loads((a / "summary.json").read_text())
    stopped.update(interrupted=True, stopped_by="SIGTERM", steps=3)
    (live / "summary.json").write_text(json.dumps(stopped))
    assert load_run(live).status == "interrupted by SIGTERM at step 3"


def test_not_a_run_directory_is_exit_2(tmp_path, capsys):
    assert run(["report", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 2
    assert "is not a tunesmith run directory" in capsys.readouterr().err


def test_out_that_cannot_be_a_file_is_exit_2_and_leaves_nothing(tmp_path, capsys):
    """`--out` naming a directory used to end in IsADirectoryError (a traceback, exit 1) with a
    stray `DIR.tmp` left beside it."""
    runs = tmp_path / "run"
    runs.mkdir()
    (runs / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5, "lr": 0.001}\n')
    assert run(["report", str(runs), "--out", str(runs)]) == 2
    err = capsys.readouterr().err
    assert f"--out {runs} is a directory; give a file name, e.g. {runs / 'report.html'}" in err
    assert "Traceback" not in err and not (tmp_path / "run.tmp").exists()
    (tmp_path / "afile").write_text("x")
    assert run(["report", str(runs), "--out", str(tmp_path / "afile" / "r.html")]) == 2
    assert f"cannot write --out {tmp_path / 'afile' / 'r.html'} (File exists: " \
        in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "run"]
    assert run(["report", str(runs), "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CPU_CHARTS = {"loss", "perplexity", "lr", "grad_norm", "tokens_per_s", "skipped"}


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_report_renders_in_headless_chromium(two_runs, tmp_path, capsys):
    """Both reports open offline in Chromium: every chart drawn with its series, no console error,
    no request beyond the file itself; a screenshot is taken (kept in docs/ when
    TUNESMITH_DOCS_SCREENSHOTS names a folder)."""
    import os

    sync_playwright = pytest.importorskip("playwright.sync_api", reason="needs playwright").sync_playwright
    a, b = two_runs
    cmp_html = tmp_path / "cmp.html"
    assert run(["report", str(a), str(b), "--out", str(cmp_html)]) == 0
    capsys.readouterr()
    keep = os.environ.get("TUNESMITH_DOCS_SCREENSHOTS")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            for page_file, runs in ((a / "report.html", ["a"]), (cmp_html, ["a", "b"])):
                ctx = browser.new_context(viewport={"width": 1280, "height": 900}, offline=True)
                page = ctx.new_page()
                problems, requests = [], []
                page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
                page.on("pageerror", lambda e: problems.append(str(e)))
                page.on("request", lambda r: requests.append(r.url))
                page.goto(page_file.as_uri(), wait_until="load")
                charts = page.eval_on_selector_all("div.card", """cards => cards.map(c => ({
                    id: c.dataset.chart,
                    width: c.querySelector('svg.chart').getBoundingClientRect().width,
                    paths: [...c.querySelectorAll('svg.chart path[data-series]')]
                        .filter(p => p.getAttribute('d').length > 8).map(p => p.dataset.series),
                    markers: [...c.querySelectorAll('svg.chart [data-marker]')].map(m => m.dataset.marker)}))""")
                assert {c["id"] for c in charts} == CPU_CHARTS
                for c in charts:
                    assert c["width"] > 200 and c["paths"], c
                    assert "checkpoint" in c["markers"], c
                loss = next(c for c in charts if c["id"] == "loss")["paths"]
                prefix = (lambda r: f"{r}: ") if len(runs) > 1 else (lambda r: "")
                assert {f"{prefix(r)}{s}" for r in runs for s in ("train loss", "eval loss")} <= set(loss)
                shot = tmp_path / f"{page_file.stem}.png"
                page.screenshot(path=str(shot), full_page=False)
                assert shot.stat().st_size > 20_000  # a drawn page, not a blank one
                assert not problems, problems
                assert requests == [page_file.as_uri()], requests
                if keep:
                    shutil.copy(shot, os.path.join(keep, f"report-{'compare' if len(runs) > 1 else 'run'}.png"))
                ctx.close()
        finally:
            browser.close()
