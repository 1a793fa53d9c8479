"""`tunesmith eval MODEL --harness TASKS`: lm-evaluation-harness tasks on a tunesmith model.

lm_eval is an optional dependency (`pip install lm-eval`): imported only here, and a missing
install is one line. Task names are checked against lm_eval's task index (plus
--include-path) before the model loads, so a typo costs no model load.
"""

from __future__ import annotations

import difflib
import json
import logging
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError
from tunesmith.hf.files import check_file_target, write_text_atomic

log = logging.getLogger("tunesmith")


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise TunesmithError("--harness needs lm-evaluation-harness: pip install lm-eval") from None


def task_manager(tasks: list[str], include_path: str | None) -> Any:
    """lm_eval's task index. Tasks all found under --include-path skip indexing lm_eval's own
    few thousand task YAMLs (seconds); anything else (built-in tasks, groups) uses both."""
    from lm_eval.tasks import TaskManager

    if include_path is None:
        return TaskManager()
    path = Path(include_path).expanduser()
    if not path.is_dir():
        raise TunesmithError(f"--include-path {include_path}: no such directory")
    local = TaskManager(include_path=str(path), include_defaults=False)
    if all(name in local.all_subtasks for name in tasks):
        return local
    return TaskManager(include_path=str(path))


def check_tasks(tasks: list[str], manager: Any) -> None:
    """Refuse task names lm_eval does not know (one line, with the nearest known name)."""
    known = manager.all_tasks
    for name in tasks:
        if not name or not manager.match_tasks([name]):
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TunesmithError(f"--harness: unknown lm-eval task {name!r}{hint} "
                                 "(tasks of your own: --include-path DIR of task YAMLs)")


def run_harness(
    model: str, tasks: list[str], *, num_fewshot: int | None = None, limit: int | None = None,
    batch_size: int = 8, device: str = "auto", precision: str = "bf16",
    include_path: str | None = None, output: str | None = None, base: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run lm_eval tasks on `model` (HF-format dir or PEFT adapter dir) with TunesmithLM;
    returns lm_eval's results dict (without per-sample logs) and writes it to `output`."""
    require_lm_eval()
    if limit is not None and limit < 1:
        raise TunesmithError(f"--limit must be >= 1, got {limit}")
    if output:
        check_file_target(output, "--output", "results.json")
    manager = task_manager(tasks, include_path)
    check_tasks(tasks, manager)
    import lm_eval

    from tunesmith.eval.harness import TunesmithLM

    lm = TunesmithLM(model, base=base, batch_size=batch_size, device=device, precision=precision,
                     seed=seed)
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
            log_samples=False, bootstrap_iters=1000, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed,
        )
    except ConnectionError as e:  # the task's data set is on a hub this machine cannot reach
        raise TunesmithError(f"--harness {','.join(tasks)}: cannot fetch the task's data ({e}); "
                             "run where the hub is reachable, or give local task YAMLs with "
                             "--include-path") from None
    except (FileNotFoundError, ValueError) as e:  # a task's data or config that cannot be read
        raise TunesmithError(f"--harness {','.join(tasks)}: {e}") from None
    if results is None:
        raise TunesmithError("lm-eval returned no results")
    results["config"]["model"] = "tunesmith"
    results["config"]["model_args"] = {"pretrained": model, "base": base, "precision": lm.rt.precision}
    if output:
        write_results(results, output)
    return results


def write_results(results: dict[str, Any], output: str) -> Path:
    """lm_eval's results JSON, written atomically (a crash leaves no half file)."""
    from lm_eval.utils import handle_non_serializable

    text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
    return write_text_atomic(output, text, "--output", "results.json")


def result_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(task, n-shot, metric, value, stderr) for each metric lm_eval reported."""
    rows = []
    for task, metrics in results.get("results", {}).items():
        shots = str(results.get("n-shot", {}).get(task, ""))
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric in ("alias", "samples") or metric.endswith("_stderr") or not filt:
                continue
            err = metrics.get(f"{metric}_stderr,{filt}")
            label = metric if filt == "none" else f"{metric} ({filt})"
            rows.append((task, shots, label, _fmt(value), _fmt(err)))
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value in (None, "N/A") else str(value)
