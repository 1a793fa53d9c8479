"""Model families and the high-level model API used by the trainer and CLI.

A family bundles config class, model class, state-dict adapter and presets; it is looked up
by HF `model_type` ("llama", "mistral" and "qwen2" all use the Llama family).

Typical flow (weights are never held twice in host memory):
    family, cfg = resolve_model_config("meta-llama/Llama-3.2-1B")
    model = build_model(family, cfg)                          # on meta: nothing allocated
    load_pretrained(model, "meta-llama/Llama-3.2-1B", "cuda", torch.bfloat16)
"""

from __future__ import annotations

import difflib
import importlib.metadata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.hf import io as hfio
from tunesmith.models import hf_generic
from tunesmith.models.bert import config as bert_config
from tunesmith.models.bert.adapter import BertStateDictAdapter
from tunesmith.models.bert.config import BertConfig
from tunesmith.models.bert.model import BertMLM
from tunesmith.models.gpt2 import config as gpt2_config
from tunesmith.models.gpt2.adapter import GPT2StateDictAdapter
from tunesmith.models.gpt2.config import GPT2Config
from tunesmith.models.gpt2.model import GPT2
from tunesmith.models.llama.adapter import LlamaStateDictAdapter
from tunesmith.models.llama.config import PRESET_NAMES, LlamaConfig, apply_overrides, preset
from tunesmith.models.llama.model import KVCache, Llama
from tunesmith.models.neox import config as neox_config
from tunesmith.models.neox.adapter import NeoXStateDictAdapter
from tunesmith.models.neox.config import NeoXConfig
from tunesmith.models.neox.model import NeoX

__all__ = [
    "FAMILIES", "BertConfig", "BertMLM", "GPT2", "GPT2Config", "KVCache", "Llama", "LlamaConfig",
    "ModelFamily", "NeoX", "NeoXConfig",
    "build_model", "get_family", "init_random", "load_pretrained", "resolve_model_config",
    "save_pretrained", "write_hf_config",
]

# A family's config dataclass (LlamaConfig, GPT2Config, BertConfig, ...). They share the
# attributes the code below reads: model_type, vocab_size, max_position_embeddings,
# tie_word_embeddings, bos/eos/pad_token_id, validate(), to_hf(), from_hf().
ModelConfig = Any


@dataclass(frozen=True)
class ModelFamily:
    """Everything needed to build, load and save one architecture family.

    kind: "causal" (decoder LMs: clm/sft tasks, generation) or "masked" (encoders: mlm task).
    """

    name: str
    model_types: tuple[str, ...]  # HF `model_type` values served by this family
    config_cls: type
    model_cls: type[nn.Module]
    adapter_cls: type
    presets: Mapping[str, Callable[[], ModelConfig]]
    apply_overrides: Callable[[ModelConfig, dict[str, Any] | None], ModelConfig]
    kind: str = "causal"
    # Families that load/save through transformers itself (the generic fallback).
    load_fn: Callable[..., nn.Module] | None = None
    save_fn: Callable[[nn.Module, Path], None] | None = None

    def adapter(self, cfg: ModelConfig) -> Any:
        return self.adapter_cls(cfg)


LLAMA_FAMILY = ModelFamily(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    config_cls=LlamaConfig,
    model_cls=Llama,
    adapter_cls=LlamaStateDictAdapter,
    presets={name: (lambda n=name: preset(n)) for name in PRESET_NAMES},
    apply_overrides=apply_overrides,
)
GPT2_FAMILY = ModelFamily(
    name="gpt2",
    model_types=("gpt2",),
    config_cls=GPT2Config,
    model_cls=GPT2,
    adapter_cls=GPT2StateDictAdapter,
    presets={n: (lambda n=n: gpt2_config.preset(n)) for n in gpt2_config.PRESET_NAMES},
    apply_overrides=gpt2_config.apply_overrides,
)
BERT_FAMILY = ModelFamily(
    name="bert",
    model_types=("bert", "roberta"),
    config_cls=BertConfig,
    model_cls=BertMLM,
    adapter_cls=BertStateDictAdapter,
    presets={n: (lambda n=n: bert_config.preset(n)) for n in bert_config.PRESET_NAMES},
    apply_overrides=bert_config.apply_overrides,
    kind="masked",
)
NEOX_FAMILY = ModelFamily(
    name="gpt_neox",
    model_types=("gpt_neox",),
    config_cls=NeoXConfig,
    model_cls=NeoX,
    adapter_cls=NeoXStateDictAdapter,
    presets={n: (lambda n=n: neox_config.preset(n)) for n in neox_config.PRESET_NAMES},
    apply_overrides=neox_config.apply_overrides,
)
FAMILIES: dict[str, ModelFamily] = {
    mt: fam for fam in (LLAMA_FAMILY, GPT2_FAMILY, BERT_FAMILY, NEOX_FAMILY)
    for mt in fam.model_types
}
# Any other model_type transformers knows runs through the (slower) generic HF wrapper.
GENERIC_FAMILY = ModelFamily(
    name="hf",
    model_types=(),
    config_cls=hf_generic.GenericConfig,
    model_cls=hf_generic.HFCausalLM,
    adapter_cls=hf_generic.GenericAdapter,
    presets={},
    apply_overrides=hf_generic.apply_overrides,
    load_fn=hf_generic.load_generic,
    save_fn=hf_generic.save_generic,
)


def usable_positions(cfg: ModelConfig) -> int:
    """Longest sequence a config's position table/RoPE range covers (RoBERTa: 2 rows less)."""
    return int(getattr(cfg, "max_positions", cfg.max_position_embeddings))


def get_family(model_type: str) -> ModelFamily:
    if model_type not in FAMILIES and model_type and hf_generic.known_model_type(model_type):
        return GENERIC_FAMILY
    if model_type not in FAMILIES:
        raise TunesmithError(
            f"unsupported model_type {model_type!r}; known: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def _all_presets() -> dict[str, ModelFamily]:
    unique = {id(fam): fam for fam in FAMILIES.values()}.values()
    return {p: fam for fam in unique for p in fam.presets}


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = dtype.replace("torch.", "")
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}
    resolved = getattr(torch, aliases.get(name, name), None)
    if not isinstance(resolved, torch.dtype):
        raise TunesmithError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return resolved


# ---------------------------------------------------------------------------- configs
def _local_config_path(source: str) -> Path | None:
    p = Path(source).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise TunesmithError(f"model directory {p} has no config.json")
        return p / "config.json"
    return None


def resolve_model_config(
    source: str, overrides: dict[str, Any] | None = None
) -> tuple[ModelFamily, ModelConfig]:
    """Config from a preset name, a local dir / config.json path, or a hub id, plus overrides."""
    presets = _all_presets()
    local = _local_config_path(source)
    if local is None and source in presets:
        family = presets[source]
        return family, family.apply_overrides(family.presets[source](), overrides)
    if local is None:
        neither = (f"model {source!r} is neither a preset ({', '.join(sorted(presets))}), "
                   "a local path, nor reachable on the HF hub")
        if not hfio.looks_like_hub_id(source):
            close = difflib.get_close_matches(source, list(presets), n=1)
            raise TunesmithError(neither + (f"; did you mean {close[0]!r}?" if close else ""))
        try:
            local = hfio.download_hub_file(source, "config.json")
        except TunesmithError as e:
            raise TunesmithError(f"{neither} ({e})") from None
    hf_cfg = hfio.read_json(local)
    hfio.check_config_types(local, hf_cfg)
    family = get_family(str(hf_cfg.get("model_type", "")))
    try:
        cfg = family.config_cls.from_hf(hf_cfg)
    except (ValueError, TypeError, KeyError) as e:  # a field the type check above does not know
        raise TunesmithError(f"{local}: cannot read the model config ({e})") from None
    return family, family.apply_overrides(cfg, overrides)


# ---------------------------------------------------------------------------- building
def build_model(
    family: ModelFamily, cfg: ModelConfig, device: str | torch.device = "meta"
) -> nn.Module:
    """Construct the model on `device`. On meta nothing is allocated; elsewhere weights get
    `init_weights()` so the model is immediately usable."""
    cfg.validate()
    with torch.device(device):
        model = family.model_cls(cfg)
    if torch.device(device).type != "meta":
        model.init_weights()
    return model


def init_random(
    model: nn.Module, device: str | torch.device, dtype: torch.dtype | str, seed: int
) -> nn.Module:
    """Materialise `model` on `device` in `dtype` and initialise it for training from scratch."""
    device = torch.device(device)
    if device.type == "meta":
        raise TunesmithError("init_random: device must be a real device (cpu, cuda), not meta")
    model.to(dtype=_as_dtype(dtype))  # on meta this only changes metadata
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    model.init_weights(generator=generator)  # type: ignore[operator]
    return model


# ---------------------------------------------------------------------------- loading
def _weights_dir(source: str) -> Path:
    p = Path(source).expanduser()
    if p.is_dir():
        return p
    if p.is_file():
        return p.parent
    if source in _all_presets():
        raise TunesmithError(f"{source!r} is a preset: it has an architecture but no weights")
    if not hfio.looks_like_hub_id(source):
        raise TunesmithError(f"model weights not found: {source!r} is not a local path or hub id")
    return hfio.snapshot_model_repo(source)


def _few(names: list[str], n: int = 5) -> str:
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(sorted(names)[:n]) + more


def _plan_load(model: nn.Module, files: list[Path], allow_pickle: bool = False,
               skip: frozenset[str] = frozenset()) -> dict[str, str]:
    """Check checkpoint names/shapes against the model; return hf name -> native name.

    `skip`: model tensors the checkpoint does not hold by design (LoRA adapters added to the
    model before a sharded load)."""
    cfg: ModelConfig = model.cfg
    adapter = get_family(cfg.model_type).adapter(cfg)
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in skip}
    if cfg.tie_word_embeddings:
        expected.pop("output.weight", None)
    mapping: dict[str, str] = {}
    unexpected: list[str] = []
    bad_shapes: list[str] = []
    for hf_name, (shape, _) in hfio.tensor_shapes(files, allow_pickle).items():
        try:
            native = adapter.hf_key_to_native(hf_name)
        except TunesmithError:
            unexpected.append(hf_name)
            continue
        if native is None:
            continue
        shape = adapter.shape_to_native(hf_name, shape)
        if native not in expected:
            unexpected.append(hf_name)
        elif tuple(expected[native].shape) != shape:
            bad_shapes.append(f"{hf_name} {list(shape)} vs model {list(expected[native].shape)}")
        else:
            mapping[hf_name] = native
    where = files[0].parent
    if unexpected:
        raise TunesmithError(f"checkpoint {where} has unexpected tensors: {_few(unexpected)}")
    if bad_shapes:
        raise TunesmithError(f"checkpoint {where} shape mismatch: {_few(bad_shapes, 3)}")
    missing = sorted(set(expected) - set(mapping.values()))
    if missing:
        raise TunesmithError(f"checkpoint {where} is missing tensors: {_few(missing)}")
    return mapping


def load_pretrained(
    model_on_meta: nn.Module,
    source: str,
    device: str | torch.device,
    dtype: torch.dtype | str,
    *,
    allow_pickle: bool = False,
) -> nn.Module:
    """Materialise the model on `device`/`dtype` and stream HF weights into it.

    Pickle weights (`.bin`) load with `weights_only=True`; ones that need arbitrary code are
    refused unless `allow_pickle` (the config's `model.allow_unsafe_pickle`).

    Names and shapes are checked from file headers before anything is allocated. Tensors are
    then read one at a time (safetensors are memory-mapped, shard files visited in turn) and
    copied into the already-allocated parameters, so host memory never holds the model twice.
    """
    family = get_family(model_on_meta.cfg.model_type)
    if family.load_fn is not None:
        return family.load_fn(model_on_meta, _weights_dir(source), device, _as_dtype(dtype))
    files = hfio.find_weight_files(_weights_dir(source))
    mapping = _plan_load(model_on_meta, files, allow_pickle)
    adapter = get_family(model_on_meta.cfg.model_type).adapter(model_on_meta.cfg)
    model = model_on_meta
    model.to(dtype=_as_dtype(dtype))
    model.to_empty(device=torch.device(device))  # re-ties and recomputes RoPE (Llama._apply)
    params = dict(model.state_dict(keep_vars=True))
    with torch.no_grad():
        for hf_name, tensor in hfio.iter_tensors(files, allow_pickle):
            native = mapping.get(hf_name)
            if native is not None:
                params[native].copy_(adapter.tensor_to_native(hf_name, tensor))
            del tensor
    return model


# ---------------------------------------------------------------------------- saving
def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def write_hf_config(out_dir: str | Path, cfg: ModelConfig, dtype: torch.dtype | str) -> None:
    """Write HF `config.json` and `generation_config.json` for `cfg` with weights in `dtype`."""
    out = Path(out_dir)
    hf_cfg = cfg.to_hf()
    hf_cfg["dtype"] = str(_as_dtype(dtype)).replace("torch.", "")
    gen_cfg: dict[str, Any] = {"_from_model_config": True, "bos_token_id": cfg.bos_token_id,
                               "eos_token_id": cfg.eos_token_id}
    if cfg.pad_token_id is not None:
        gen_cfg["pad_token_id"] = cfg.pad_token_id
    version = _version("transformers")
    if version:
        hf_cfg["transformers_version"] = gen_cfg["transformers_version"] = version
    hfio.write_json(out / "config.json", hf_cfg)
    hfio.write_json(out / "generation_config.json", gen_cfg)


def save_pretrained(
    model: nn.Module,
    family: ModelFamily,
    cfg: ModelConfig,
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    max_shard_size_bytes: int = 5 * 2**30,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Write a HF-loadable model dir (config, generation config, safetensors, tokenizer).

    Everything is written to a hidden temp dir beside `out_dir` and renamed into place at
    the end. Tensors are copied to host one shard at a time.
    """
    if family.save_fn is not None:
        with hfio.atomic_output_dir(out_dir) as tmp:
            family.save_fn(model, tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        return Path(out_dir)
    adapter = family.adapter(cfg)
    target = _as_dtype(dtype)
    hf_tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        hf_name = adapter.native_key_to_hf(name)
        if hf_name is not None:
            hf_tensors[hf_name] = adapter.tensor_to_hf(name, t)
    saved_dtype = target or next(iter(hf_tensors.values())).dtype

    def to_host(name: str) -> torch.Tensor:
        return hf_tensors[name].detach().to("cpu", target or hf_tensors[name].dtype).contiguous()

    def nbytes(name: str) -> int:
        t = hf_tensors[name]
        return t.numel() * (target or t.dtype).itemsize

    with hfio.atomic_output_dir(out_dir) as tmp:
        write_hf_config(tmp, cfg, saved_dtype)
        hfio.save_safetensors_sharded(tmp, list(hf_tensors), to_host, nbytes, max_shard_size_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)


def is_preset(name: str) -> bool:
    """True when `name` is a named size (e.g. `llama3-8b`), not a path or hub id."""
    return name in _all_presets()
