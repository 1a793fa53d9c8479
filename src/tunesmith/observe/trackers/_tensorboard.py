"""TensorBoard: event files in OUTPUT/tensorboard, written by torch's SummaryWriter."""

from __future__ import annotations

from typing import Any

from tunesmith.observe.trackers.base import Tracker, flat_config, summary_scalars


class TensorBoardTracker(Tracker):
    name = "tensorboard"
    module = "tensorboard"

    def start(self, config: dict[str, Any], resume_id: str | None, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        log_dir = self.s.options.get("log_dir", str(self.s.out_dir / "tensorboard"))
        opts = {k: v for k, v in self.s.options.items() if k != "log_dir"}
        # A resumed run: purge events the interrupted run wrote after the checkpoint's step.
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=step + 1 if step else None, **opts)
        self.run_id = log_dir
        if resume_id is None:
            params = flat_config(config)
            # The HParams plugin (its own tab) plus the whole config as text.
            for summary in hparams(params, {}):
                self.writer.file_writer.add_summary(summary)
            text = "\n".join(f"    {k}: {v}" for k, v in params.items())
            self.writer.add_text("config", text, 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_summary(self, summary: dict[str, Any]) -> None:
        step = int(summary.get("steps", 0))
        text = "\n".join(f"    {k}: {v}" for k, v in summary_scalars(summary).items())
        self.writer.add_text("summary", text, step)

    def finish(self, ok: bool) -> None:
        self.writer.close()
