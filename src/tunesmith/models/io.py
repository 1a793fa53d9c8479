"""Model load, build and save: the public module every load and save path uses.

    family, cfg = resolve_model_config("meta-llama/Llama-3.2-1B")   # tunesmith.models.registry
    model = build_model(family, cfg)                                 # on meta: nothing allocated
    load_pretrained(model, "meta-llama/Llama-3.2-1B", "cuda", torch.bfloat16)
    save_pretrained(model, family, cfg, "out/final")                 # through write_hf_dir

Weights are never held twice in host memory: loads check names and shapes from the file
headers (`plan_load`), then stream tensor by tensor; saves go file by file through the one HF
directory writer, `write_hf_dir`.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.hf import io as hfio
from tunesmith.models.family import ModelConfig, ModelFamily
from tunesmith.models.registry import all_presets, family_of, get_family

DEFAULT_SHARD_BYTES = 5 * 2**30  # HF's default max_shard_size ("5GB" in GiB)


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = dtype.replace("torch.", "")
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}
    resolved = getattr(torch, aliases.get(name, name), None)
    if not isinstance(resolved, torch.dtype):
        raise TunesmithError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return resolved


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
    model.to(dtype=as_dtype(dtype))  # on meta this only changes metadata
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    model.init_weights(generator=generator)  # type: ignore[operator]
    return model


# ---------------------------------------------------------------------------- loading
def weights_dir(source: str) -> Path:
    p = Path(source).expanduser()
    if p.is_dir():
        return p
    if p.is_file():
        return p.parent
    if source in all_presets():
        raise TunesmithError(f"{source!r} is a preset: it has an architecture but no weights")
    if not hfio.looks_like_hub_id(source):
        raise TunesmithError(f"model weights not found: {source!r} is not a local path or hub id")
    return hfio.snapshot_model_repo(source)


def _few(names: list[str], n: int = 5) -> str:
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(sorted(names)[:n]) + more


def _same_shape(param: torch.Tensor, shape: tuple[int, ...]) -> bool:
    """The checkpoint's shape is the parameter's; QLoRA stores a stacked MoE expert weight
    [E, out, in] as an NF4 tensor [E*out, in] (by class name: models do not import peft)."""
    if tuple(param.shape) == shape:
        return True
    local = getattr(param, "_local_tensor", param)  # an FSDP2 shard's local tensor
    return (type(local).__name__ == "NF4Tensor" and len(shape) == 3
            and tuple(param.shape) == (shape[0] * shape[1], shape[2]))


def plan_load(model: nn.Module, files: list[Path], allow_pickle: bool = False,
               skip: frozenset[str] = frozenset()) -> dict[str, str]:
    """Check checkpoint names/shapes against the model; return hf name -> native name.

    `skip`: model tensors the checkpoint does not hold by design (LoRA adapters added to the
    model before a sharded load)."""
    cfg: ModelConfig = model.cfg
    adapter = family_of(model).adapter(cfg)
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in skip}
    if cfg.tie_word_embeddings:
        expected.pop("output.weight", None)
    mapping: dict[str, str] = {}
    unexpected: list[str] = []
    bad_shapes: list[str] = []
    for hf_name, (shape, _) in adapter.hf_view_shapes(hfio.tensor_shapes(files, allow_pickle)).items():
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
        elif not _same_shape(expected[native], shape):
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
    family = family_of(model_on_meta)
    if family.load_fn is not None:
        model_on_meta.to(dtype=as_dtype(dtype))
        return family.load_fn(model_on_meta, weights_dir(source), device, as_dtype(dtype))
    files = hfio.find_weight_files(weights_dir(source))
    mapping = plan_load(model_on_meta, files, allow_pickle)
    adapter = family.adapter(model_on_meta.cfg)
    model = model_on_meta
    model.to(dtype=as_dtype(dtype))
    model.to_empty(device=torch.device(device))  # re-ties and recomputes RoPE (Llama._apply)
    params = dict(model.state_dict(keep_vars=True))
    with torch.no_grad():
        for hf_name, tensor in adapter.hf_view_tensors(hfio.iter_tensors(files, allow_pickle)):
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
    hf_cfg["dtype"] = str(as_dtype(dtype)).replace("torch.", "")
    gen_cfg: dict[str, Any] = {"_from_model_config": True, "bos_token_id": cfg.bos_token_id,
                               "eos_token_id": cfg.eos_token_id}
    if cfg.pad_token_id is not None:
        gen_cfg["pad_token_id"] = cfg.pad_token_id
    version = _version("transformers")
    if version:
        hf_cfg["transformers_version"] = gen_cfg["transformers_version"] = version
    hfio.write_json(out / "config.json", hf_cfg)
    hfio.write_json(out / "generation_config.json", gen_cfg)


def write_hf_dir(
    out_dir: str | Path,
    cfg: ModelConfig,
    names: list[str],
    get_tensor: Callable[[str], torch.Tensor],
    nbytes: Callable[[str], int],
    *,
    saved_dtype: torch.dtype,
    tokenizer: Any = None,
    max_shard_size_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """The one writer of a HF model directory: config.json + generation_config.json,
    safetensors (sharded with an index above `max_shard_size_bytes`) and the tokenizer, written
    to a hidden temp dir and renamed into place, so a failure leaves nothing half-written.

    `names` are HF tensor names in file order; `get_tensor(name)` returns one host tensor in
    HF layout when its file is written (callers stream: from a live model, gathered from
    shards, or read from a checkpoint); `nbytes(name)` sizes it for the shard plan first.
    Every save path uses it: `save_pretrained`, `parallel.export.save_pretrained_distributed`
    and `checkpoint.export.export_hf`.
    """
    # The family's file layout (the MoE family splits stacked experts into per-expert tensors).
    names, get_tensor, nbytes = get_family(cfg.model_type).adapter(cfg).hf_save_view(
        names, get_tensor, nbytes)
    with hfio.atomic_output_dir(out_dir) as tmp:
        write_hf_config(tmp, cfg, saved_dtype)
        hfio.save_safetensors_sharded(tmp, names, get_tensor, nbytes, max_shard_size_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)


def save_pretrained(
    model: nn.Module,
    family: ModelFamily,
    cfg: ModelConfig,
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    max_shard_size_bytes: int = DEFAULT_SHARD_BYTES,
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
    target = as_dtype(dtype)
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

    return write_hf_dir(out_dir, cfg, list(hf_tensors), to_host, nbytes, saved_dtype=saved_dtype,
                        tokenizer=tokenizer, max_shard_size_bytes=max_shard_size_bytes)
