"""benchmarks/quality_guard.py in its CPU smoke mode: real `tunesmith.train` runs on a slice of
the real data, the table and JSON it writes, and the CUDA-only modes skipped with a reason.
The full table (~174M model, 320 steps) runs on a GPU: benchmarks/run_perf_device.sh."""

from __future__ import annotations

import importlib.util
import json
import math

from tests.conftest import REPO, shared_path


def _load():
    spec = importlib.util.spec_from_file_location("quality_guard", REPO / "benchmarks" / "quality_guard.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cpu_smoke_writes_table(tmp_path):
    data = shared_path("text", "wikitext-2", "wiki.test.raw").parents[2]
    shared_path("tokenizers", "llama3", "hf", "tokenizer.json")
    qg = _load()
    rc = qg.main(["--out", str(tmp_path), "--data", str(data), "--device", "cpu", "--steps", "3",
                  "--max-chars", "20000", "--in-process",
                  "--modes", "bf16,ac-full,float8-tensorwise,lora-bf16"])
    assert rc == 0
    res = json.loads((tmp_path / "result.json").read_text())["results"]
    base, ac = res["bf16"], res["ac-full"]
    assert math.isfinite(base["eval_loss"]) and base["summary"]["steps"] == 3
    # Recomputation in fp32 on CPU is the same arithmetic: the guard must see no difference.
    assert abs(ac["rel_diff"]) < 1e-5 and ac["pass"] is True and ac["baseline"] == "bf16"
    assert res["float8-tensorwise"] == {"skipped": "needs CUDA", "baseline": "bf16"}
    # LoRA trained on the baseline's exported model (its own baseline: none above it).
    assert math.isfinite(res["lora-bf16"]["eval_loss"]) and res["lora-bf16"]["baseline"] is None
    md = (tmp_path / "result.md").read_text()
    assert "| ac-full | bf16 |" in md and "+0.00% | yes" in md
    assert "| float8-tensorwise | bf16 | skipped: needs CUDA" in md


def test_unknown_mode_is_refused(tmp_path, capsys):
    data = shared_path("text", "wikitext-2", "wiki.test.raw").parents[2]
    qg = _load()
    assert qg.main(["--out", str(tmp_path), "--data", str(data), "--modes", "bf16,fp4"]) == 2
    assert "unknown mode 'fp4'" in capsys.readouterr().err
