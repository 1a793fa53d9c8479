"""MLflow, through an explicit `MlflowClient` (no global active run).

Default store: MLFLOW_TRACKING_URI, else a file store in OUTPUT/mlruns. MLflow 3 keeps the file
store only behind MLFLOW_ALLOW_FILE_STORE=true; it is set here just for a file store this
tracker chose itself. The run id is saved in each checkpoint, so a resumed run logs into the
same MLflow run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from tunesmith.observe.trackers.base import Tracker, flat_config, summary_scalars

_BATCH = 100  # MLflow's log_batch limit on params per call (and a sane metrics chunk)
_MAX_PARAM = 6000  # MLflow's limit on a param value's length


class MlflowTracker(Tracker):
    name = "mlflow"
    module = "mlflow"

    def start(self, config: dict[str, Any], resume_id: str | None, step: int) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        uri = self.s.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None:
            uri = (self.s.out_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri, **self.s.options)
        if resume_id is not None:
            self.run_id = resume_id
            self.client.update_run(resume_id, status="RUNNING")
            return
        exp = self.client.get_experiment_by_name(self.s.project)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(self.s.project)
        tags = {t: "" for t in self.s.tags}
        run = self.client.create_run(exp_id, run_name=self.s.run_name, tags=tags)
        self.run_id = run.info.run_id
        params = [Param(k, str(v)[:_MAX_PARAM]) for k, v in flat_config(config).items()]
        for i in range(0, len(params), _BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + _BATCH])

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), _BATCH):
            self.client.log_batch(self.run_id, metrics=batch[i:i + _BATCH])

    def log_summary(self, summary: dict[str, Any]) -> None:
        scalars = summary_scalars(summary)
        step = int(summary.get("steps", 0))
        self.log({f"summary/{k}": float(v) for k, v in scalars.items() if not isinstance(v, str)}, step)
        self.client.log_dict(self.run_id, summary, "summary.json")

    def log_artifact(self, path: Path, name: str) -> bool:
        self.client.log_artifacts(self.run_id, str(path), name)
        return True

    def finish(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")
