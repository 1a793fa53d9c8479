"""Model families and the model API used by the assembly layer, eval and the CLI.

    family.py     ModelFamily: the descriptor each family folder exports as `FAMILY`
    registry.py   discovery of the family folders, get_family, resolve_model_config
    io.py         build_model / init_random / load_pretrained / save_pretrained / write_hf_dir
    llama/ gpt2/ gptj/ neox/ bert/   one folder per family (config, model, HF adapter, plans)
    attention.py rope.py kv_cache.py layers.py   building blocks shared by the families
"""

from tunesmith.models.bert.config import BertConfig
from tunesmith.models.bert.model import BertMLM
from tunesmith.models.family import ModelConfig, ModelFamily
from tunesmith.models.gpt2.config import GPT2Config
from tunesmith.models.gpt2.model import GPT2
from tunesmith.models.gptj.config import GPTJConfig
from tunesmith.models.gptj.model import GPTJ
from tunesmith.models.io import (
    as_dtype,
    build_model,
    init_random,
    load_pretrained,
    plan_load,
    save_pretrained,
    weights_dir,
    write_hf_config,
    write_hf_dir,
)
from tunesmith.models.kv_cache import KVCache
from tunesmith.models.llama.config import LlamaConfig
from tunesmith.models.llama.model import Llama
from tunesmith.models.neox.config import NeoXConfig
from tunesmith.models.neox.model import NeoX
from tunesmith.models.registry import (
    all_presets,
    families,
    family_of,
    get_family,
    is_preset,
    resolve_model_config,
    usable_positions,
)

__all__ = [
    "BertConfig", "BertMLM", "GPT2", "GPT2Config", "GPTJ", "GPTJConfig", "KVCache", "Llama", "LlamaConfig",
    "ModelConfig", "ModelFamily", "NeoX", "NeoXConfig", "all_presets", "as_dtype", "build_model",
    "families", "family_of", "get_family", "init_random", "is_preset", "load_pretrained",
    "plan_load", "resolve_model_config", "save_pretrained", "usable_positions", "weights_dir",
    "write_hf_config", "write_hf_dir",
]
