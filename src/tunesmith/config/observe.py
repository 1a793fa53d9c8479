"""The observability sections of the run config: `logging` (metrics, trackers, report) and
`profile` (profiler, memory snapshot, FLOP counter). Split from schema.py to keep it small;
`tunesmith.config.schema` re-exports both."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tunesmith.config.section import Section

TrackerName = Literal["tensorboard", "wandb", "mlflow", "trackio"]
# Words that mark an option as a credential: those come from the environment only.
_SECRET_WORDS = ("key", "token", "password", "secret")


class LoggingConfig(Section):
    steps: int = Field(10, gt=0, description="Write a metrics.jsonl record every N steps.")
    progress: bool = Field(True, description="Live progress bar (rank 0, TTY only).")
    peak_tflops: float | None = Field(
        None, gt=0, description="Device bf16 dense peak for MFU; default: known GPUs table."
    )
    # Experiment trackers (docs/observability.md); each needs its extra: tunesmith[wandb] etc.
    trackers: list[TrackerName] = Field(
        default_factory=list,
        description="Experiment trackers fed from rank 0: tensorboard (OUTPUT/tensorboard), wandb, "
        "mlflow, trackio. Each needs its extra, e.g. pip install 'tunesmith[wandb]'.",
    )
    project: str = Field("tunesmith", description="Tracker project (W&B/trackio) or MLflow experiment.")
    run_name: str | None = Field(None, description="Tracker run name; default: output.dir's name.")
    tags: list[str] = Field(default_factory=list, description="Tags for the tracker run.")
    entity: str | None = Field(None, description="W&B entity (team or user).")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default: MLFLOW_TRACKING_URI, else a file store "
        "in OUTPUT/mlruns.",
    )
    tracker_options: dict[TrackerName, dict[str, Any]] = Field(
        default_factory=dict,
        description="Extra keyword arguments per tracker, passed through: wandb.init, trackio.init, "
        "SummaryWriter, MlflowClient. Credentials come from the environment only.",
    )
    log_model: bool = Field(
        False, description="Upload OUTPUT/final to the trackers that store artifacts (wandb, mlflow)."
    )
    report: bool = Field(True, description="Write OUTPUT/report.html (charts, config, summary) at the end.")

    @field_validator("tracker_options")
    @classmethod
    def _no_secrets(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for tracker, opts in value.items():
            for key in opts:
                if any(w in key.lower() for w in _SECRET_WORDS):
                    raise ValueError(
                        f"{tracker}.{key}: credentials are read from the environment (e.g. "
                        "WANDB_API_KEY), never from a config, so they stay out of logs"
                    )
        return value


class ProfileConfig(Section):
    """PyTorch profiler, CUDA memory snapshot and FLOP counter (docs/observability.md)."""

    steps: tuple[int, int] | None = Field(
        None, description="Optimizer steps [start, end] (inclusive, 1-based) traced by the PyTorch "
        "profiler into OUTPUT/profile/ (Chrome/Perfetto JSON per rank).",
    )
    wait: int | None = Field(
        None, ge=0, description="llama-recipes spelling instead of steps: skip `wait` steps, warm "
        "the profiler up for `warmup`, trace `active` (steps wait+warmup+1 .. wait+warmup+active).",
    )
    warmup: int = Field(1, ge=0, description="Profiler warm-up steps before the traced ones (not recorded).")
    active: int | None = Field(None, gt=0, description="Steps traced after wait + warmup.")
    record_shapes: bool = Field(False, description="Record operator input shapes in the trace.")
    with_stack: bool = Field(False, description="Record Python stacks in the trace.")
    profile_memory: bool = Field(False, description="Record tensor allocations in the trace.")
    memory_snapshot: bool = Field(
        False, description="CUDA: record allocator history over the traced steps (or the first "
        "3 steps) and write OUTPUT/profile/memory_snapshot_rankR.pickle after them; recording "
        "stops there.",
    )
    top_kernels: int = Field(10, gt=0, description="Kernels listed in the top-by-time summary.")
    dir: str | None = Field(
        None, description="Where traces, top kernels and the memory snapshot go (default "
        "OUTPUT/profile).",
    )
    count_flops: bool = Field(
        False, description="Count one step's FLOPs with FlopCounterMode (that step runs eagerly and "
        "is left out of throughput); writes measured TFLOPs/step, achieved TFLOP/s and "
        "measured/formula ratio to summary.json.",
    )
    flop_counter_start: int = Field(
        3, ge=0, description="count_flops: warm-up steps before the counted step."
    )

    @model_validator(mode="after")
    def _window(self) -> ProfileConfig:
        if self.steps is not None:
            if self.wait is not None or self.active is not None:
                raise ValueError("set profile.steps or profile.wait/active, not both")
            start, end = self.steps
            if not 1 <= start <= end:
                raise ValueError(f"profile.steps={list(self.steps)} must be [start, end] with 1 <= start <= end")
        elif (self.wait is None) != (self.active is None):
            raise ValueError("profile.wait and profile.active go together")
        return self

    @property
    def window(self) -> tuple[int, int] | None:
        """The traced steps [start, end], from either spelling; None: no trace."""
        if self.steps is not None:
            return self.steps
        if self.wait is not None and self.active is not None:
            start = self.wait + self.warmup + 1
            return start, start + self.active - 1
        return None
