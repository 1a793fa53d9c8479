"""`tunesmith eval` and `tunesmith generate`: load an HF-format model (or a PEFT adapter
directory over its base) and use it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tunesmith.config import DataConfig
from tunesmith.config.tasks import SFTConfig
from tunesmith.data import StatefulLoader, build_clm_datasets, load_tokenizer, make_collator
from tunesmith.data.files import looks_like_path
from tunesmith.data.mlm import MaskingSpec, MLMCollator
from tunesmith.data.records import RecordReader
from tunesmith.data.sft import SFTFormatter
from tunesmith.data.sft_data import filter_category, render_split
from tunesmith.errors import TunesmithError
from tunesmith.eval.generation import evaluate_generation
from tunesmith.eval.perplexity import evaluate_loss
from tunesmith.hf import io as hfio
from tunesmith.models import build_model, get_family, load_pretrained, resolve_model_config, usable_positions
from tunesmith.models.generate import generate
from tunesmith.models.registry import adaption_point
from tunesmith.peft.adaption_io import PEFT_TYPE as ADAPTION_PROMPT
from tunesmith.peft.adaption_io import load_adaption
from tunesmith.peft.io import ADAPTER_CONFIG, load_adapter
from tunesmith.peft.merge import first_tokenizer
from tunesmith.runtime import Runtime, resolve_device, resolve_runtime


def adapter_base(source: str, base: str | None = None) -> tuple[str, str | None]:
    """(base model, adapter dir or None) for `source`: a PEFT adapter directory (what
    `tunesmith train` writes to OUTPUT/final for LoRA / DoRA / Llama-Adapter runs) names its
    base in adapter_config.json's base_model_name_or_path; `base` overrides that."""
    d = Path(source).expanduser()
    if not (d / ADAPTER_CONFIG).is_file() or (d / "config.json").is_file():
        return source, None
    if base:
        return str(base), str(d)
    base = hfio.read_json(d / ADAPTER_CONFIG).get("base_model_name_or_path")
    if not base:
        raise TunesmithError(f"adapter {d} does not name its base model "
                             "(base_model_name_or_path in adapter_config.json); pass --base")
    if looks_like_path(str(base)) and not Path(str(base)).expanduser().exists():
        # Moved or copied from another machine: say where the name came from.
        raise TunesmithError(f"adapter {d} names its base model {str(base)!r} (base_model_name_or_path "
                             "in adapter_config.json), which does not exist here; point that field "
                             "at the base model")
    return str(base), str(d)


def load_for_inference(source: str, rt: Runtime, *, base: str | None = None
                       ) -> tuple[torch.nn.Module, Any]:
    """Model (eval mode, weights from `source`, or its base plus the adapter when `source` is
    a PEFT adapter directory) and its tokenizer (the adapter's own first)."""
    base_dir, adapter_dir = adapter_base(source, base)
    family, model_cfg = resolve_model_config(base_dir)
    model = build_model(family, model_cfg, device="meta")
    load_pretrained(model, base_dir, device=rt.device, dtype=rt.param_dtype)
    if adapter_dir is None:
        model.eval()
        return model, load_tokenizer(source)
    peft_type = hfio.read_json(Path(adapter_dir) / ADAPTER_CONFIG).get("peft_type")
    if peft_type == ADAPTION_PROMPT:
        load_adaption(model, adaption_point(model_cfg.model_type), family.adapter(model_cfg),
                      adapter_dir, dtype=rt.param_dtype)
    else:  # LoRA / DoRA (read_adapter refuses anything else in one line)
        load_adapter(model, family.adapter(model_cfg), adapter_dir, adapter_dtype=rt.param_dtype)
    model.to(rt.device)
    model.eval()
    return model, first_tokenizer(adapter_dir, base_dir)


def run_eval(
    model_dir: str, data: str, *, block_size: int | None = None, batch_size: int = 8,
    device: str = "auto", precision: str = "bf16", text_column: str = "text",
    max_batches: int | None = None,
) -> dict[str, Any]:
    """Perplexity of packed `block_size` blocks of `data` (HF run_clm's --do_eval semantics)."""
    rt = resolve_runtime(device, precision)
    model, tokenizer = load_for_inference(model_dir, rt)
    max_pos = usable_positions(model.cfg)
    block = block_size or min(1024, max_pos)
    dcfg = DataConfig(
        path=data, text_column=text_column, block_size=block, validation_split_percentage=0,
        mode="packed",
    )
    try:
        ds, _ = build_clm_datasets(dcfg, tokenizer, seed=0, max_positions=max_pos)
    except TunesmithError as e:  # the data layer speaks of training and config keys
        raise TunesmithError(str(e).replace("training data", "eval data").replace(
            "data.block_size", "--block-size")) from None
    if len(ds) == 0:
        raise TunesmithError(f"{data} holds fewer than block_size={block} tokens: nothing to evaluate")
    collate = make_collator(dcfg, tokenizer)
    if get_family(model.cfg.model_type).kind == "masked":
        # Encoders: masked-LM loss with fixed (content-seeded) masks, so runs compare.
        collate = MLMCollator(MaskingSpec.from_tokenizer(tokenizer), seed=0)
    loader = StatefulLoader(
        ds, batch_size=batch_size, collate_fn=collate, shuffle=False, seed=0, drop_last=False,
    )
    out = evaluate_loss(model, loader, rt, max_batches)
    return {**out, "block_size": block, "blocks": len(ds)}


def run_generate(
    model_dir: str, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
    top_k: int | None = None, seed: int = 0, device: str = "auto",
) -> str:
    if temperature < 0:
        raise TunesmithError(f"--temperature must be >= 0, got {temperature}")
    rt = resolve_runtime(device, "bf16" if resolve_device(device).type == "cuda" else "fp32")
    model, tokenizer = load_for_inference(model_dir, rt)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(rt.device)  # [1, T]
    gen = torch.Generator(device=rt.device).manual_seed(seed)
    with rt.autocast():
        out = generate(
            model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
            eos_token_id=tokenizer.eos_token_id, generator=gen,
        )
    return tokenizer.decode(out[0], skip_special_tokens=True)


def run_generate_eval(
    model_dir: str, data: str, *, sft: Any = None, max_new_tokens: int = 128,
    max_samples: int | None = None, output: str | None = None, device: str = "auto",
    precision: str = "bf16", temperature: float = 0.0, seed: int = 0, batch_size: int = 16,
    cuda_graphs: bool = True,
) -> dict[str, Any]:
    """`tunesmith eval --generate`: answer every record of an SFT file, score ROUGE / EM
    (`batch_size` prompts at a time, left-padded; CUDA-graph decode steps on CUDA)."""
    rt = resolve_runtime(device, precision)
    model, tokenizer = load_for_inference(model_dir, rt)
    if get_family(model.cfg.model_type).kind != "causal":
        raise TunesmithError(f"eval --generate needs a causal LM; {model_dir} is an encoder")
    sft = sft or SFTConfig()
    formatter = SFTFormatter(sft, tokenizer, model_dir)
    records, _ = filter_category(formatter, RecordReader(data).read_all(), sft, data)
    items, _ = render_split(formatter, records, sft, data)
    scores = evaluate_generation(
        model, tokenizer, items, formatter.stop_ids(tokenizer), max_new_tokens=max_new_tokens,
        max_positions=usable_positions(model.cfg), out_path=output, max_samples=max_samples,
        temperature=temperature, seed=seed, autocast=rt.autocast(), batch_size=batch_size,
        cuda_graphs=cuda_graphs,
    )
    return {**scores, **({"predictions": output} if output else {})}
