"""The Python API, for notebooks and scripts: the same engine as the CLI, without exits.

    import tunesmith
    summary = tunesmith.train("recipes/llama_clm_shakespeare.yaml", train={"max_steps": 50})
    tok = tunesmith.load_tokenizer("../shared/data/models/stories260K/hf")
    model = tunesmith.load_model("../shared/data/models/stories260K/hf")
    trainer = tunesmith.Trainer.from_config({"data": {"path": "my.txt"}}, **{"optim.lr": 3e-4})

Bad input raises a `tunesmith.errors.TunesmithError` subclass (`ConfigError` for a recipe that
does not validate, `NonFiniteError` for a NaN halt); nothing here calls `sys.exit`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunesmith.config.resolve import build_config
from tunesmith.errors import TunesmithError

if TYPE_CHECKING:
    import torch

__all__ = ["build_config", "load_model", "load_tokenizer", "train"]


def _log_to_notebook() -> None:
    """Show tunesmith's INFO lines (progress, eval) when the caller configured no logging."""
    logger = logging.getLogger("tunesmith")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def train(recipe: Any = None, **overrides: Any) -> dict[str, Any]:
    """Run a whole training job, exactly as `tunesmith train` does; return its summary.

    `recipe`: a YAML path, a dict shaped like one, or a `RunConfig`; `overrides` as in
    `build_config`. Writes OUTPUT/config.yaml, metrics.jsonl, summary.json and the final model.
    The summary holds steps, train_loss, eval_loss, perplexity, tokens_per_s, final_model, ...
    Raises a `TunesmithError` subclass on bad input, `NonFiniteError` on a NaN halt.
    """
    from tunesmith.train.setup import run_training

    cfg = build_config(recipe, **overrides)
    _log_to_notebook()
    return run_training(cfg)


def load_tokenizer(name_or_path: str | Path, *, trust_remote_code: bool = False) -> Any:
    """A Hugging Face tokenizer from a local directory (or hub id), pad set to eos if missing.

    Raises `TunesmithError` for a missing path or a directory without tokenizer files.
    """
    from tunesmith.data import load_tokenizer as _load

    return _load(str(name_or_path), trust_remote_code=trust_remote_code)


def load_model(
    name_or_path: str | Path,
    *,
    overrides: dict[str, Any] | None = None,
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    pretrained: bool | None = None,
    seed: int = 0,
) -> torch.nn.Module:
    """A tunesmith model (plain `nn.Module`, in eval mode) from an HF directory, hub id or preset.

    `pretrained=None` loads weights when the source has them (a directory with safetensors, a
    hub id) and initialises randomly otherwise (a preset such as "tiny", or a config.json);
    `overrides` change the shape (`{"n_layers": 2}`, ours or HF names). Call it as
    `model(input_ids)` -> logits [batch, seq, vocab]; `model.cfg` is its config.
    """
    from tunesmith.models import (
        build_model,
        init_random,
        load_pretrained,
        resolve_model_config,
    )
    from tunesmith.build.spec import has_weights

    source = str(name_or_path)
    family, cfg = resolve_model_config(source, overrides)
    weights = has_weights(source) if pretrained is None else pretrained
    if weights and overrides:
        raise TunesmithError("load_model: overrides change the shape; they apply to a random "
                             "init only (pass pretrained=False)")
    model = build_model(family, cfg, device="meta")
    if weights:
        load_pretrained(model, source, device, dtype)
    else:
        init_random(model, device, dtype, seed)
    return model.eval()
