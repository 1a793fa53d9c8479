"""The text tower of an image+text Gemma 3 checkpoint (HF `gemma3`, Gemma3ForConditionalGeneration:
google/gemma-3-{4b,12b,27b}-{pt,it}), read as a Gemma 3 text model.

Config: the language model's settings sit under `text_config`, which the published files fill
only partly (the 4B's names five keys); the rest are transformers' `Gemma3TextConfig` defaults,
copied here. Token ids and `tie_word_embeddings` may sit at the top level (the -it files say
`"eos_token_id": [1, 106]` there) and then win, as they are the checkpoint's own.

Weights: the language model's tensors carry a prefix, in one of two layouts:
    transformers 4.5x hub files and 5.x save_pretrained:  language_model.model.layers.N...
                                                          language_model.lm_head.weight (if any)
    transformers 5.x module names (e.g. a raw state_dict): model.language_model.layers.N...
The vision tower (SigLIP) and the multi-modal projector are skipped; only text is trained, and
saves write a plain `gemma3_text` model (Gemma3ForCausalLM names).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from tunesmith.errors import TunesmithError
from tunesmith.hf import io as hfio

log = logging.getLogger("tunesmith")

MULTIMODAL_TYPE = "gemma3"
TEXT_TYPE = "gemma3_text"

# transformers' Gemma3TextConfig defaults (the same in 4.50 and 5.24): what the published
# `text_config`s leave out. vocab 262208 = 262144 text tokens + 64 image-related ones.
TEXT_DEFAULTS: dict[str, Any] = {
    "model_type": TEXT_TYPE,
    "vocab_size": 262208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "tie_word_embeddings": True,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "attention_bias": False,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "sliding_window_pattern": 6,
}
# Top-level keys of a `gemma3` config that describe the text model too, when present there.
_TOP_LEVEL_TEXT_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")
_TOP_LEVEL_DTYPE_KEYS = ("torch_dtype", "dtype")

# HF tensor-name prefixes of the language model -> the Gemma3ForCausalLM names they stand for.
_TEXT_PREFIXES = (
    ("language_model.model.", "model."),
    ("model.language_model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)
_SKIPPED = re.compile(r"^(model\.)?(vision_tower|multi_modal_projector)\.")


def text_config(hf: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """The `gemma3_text` config dict of a `gemma3` config: its `text_config` over transformers'
    defaults, with the top-level token ids / tying / dtype; one line when there is none."""
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise TunesmithError(
            f"{where}: model_type 'gemma3' without a text_config object; tunesmith trains the "
            "language model of an image+text Gemma 3 and needs its text_config")
    kind = text.get("model_type", TEXT_TYPE)
    if kind != TEXT_TYPE:
        raise TunesmithError(f"{where}: text_config.model_type {kind!r} is not {TEXT_TYPE!r}")
    hfio.check_config_types(f"{where} text_config", text)
    out = {**TEXT_DEFAULTS, **text}
    out.update({k: hf[k] for k in _TOP_LEVEL_TEXT_KEYS if k in hf})
    if not any(k in text for k in _TOP_LEVEL_DTYPE_KEYS):
        out.update({k: hf[k] for k in _TOP_LEVEL_DTYPE_KEYS if k in hf})
    log.info("model: an image+text Gemma 3 (gemma3); its language model is used and the vision "
             "tower and projector are left out; saves write the text model (Gemma3ForCausalLM)")
    return out


def text_key(key: str) -> str | None:
    """The Gemma3ForCausalLM name of a `gemma3` checkpoint tensor; None for the vision tower and
    projector (skipped); other names unchanged (the caller's name map judges them)."""
    if _SKIPPED.match(key):
        return None
    for prefix, text in _TEXT_PREFIXES:
        if key.startswith(prefix):
            return text + key[len(prefix):]
    return key
