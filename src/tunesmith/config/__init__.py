from tunesmith.config.loader import dump_config, load_config
from tunesmith.config.schema import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    OutputConfig,
    ParallelConfig,
    PeftConfig,
    RunConfig,
    ScheduleConfig,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig", "DataConfig", "EvalConfig", "LoggingConfig", "ModelConfig", "OptimConfig", "OutputConfig",
    "ParallelConfig", "PeftConfig", "RunConfig", "ScheduleConfig", "TrainConfig", "dump_config", "load_config",
]
