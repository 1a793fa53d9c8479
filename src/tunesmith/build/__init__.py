"""Assembly layer: from a run config to a runnable (parallelised, loaded) model and optimizer.

Below `train` and `eval`, above `models`, `peft`, `parallel`, `data` and `optim`. The order of
the steps is `tunesmith.build.pipeline.STEPS`; docs/architecture.md explains each.
"""

from tunesmith.build.pipeline import STEPS, Assembly, Step, assemble, build_reference
from tunesmith.build.spec import ModelSpec, has_weights, resolve_model, resolve_spec

__all__ = ["STEPS", "Assembly", "ModelSpec", "Step", "assemble", "build_reference", "has_weights",
           "resolve_model", "resolve_spec"]
