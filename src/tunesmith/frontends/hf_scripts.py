"""`tunesmith run_clm | run_mlm | run_lora_clm`: Hugging Face's example scripts' flags -> recipe.

Each function below fills one concern of the recipe from the parsed flags; `build_recipe`
calls them in recipe order. What the scripts do that tunesmith does differently is said in a
note (and in docs/migrating.md), never silently.
"""

from __future__ import annotations

from typing import Any

import yaml

from tunesmith.errors import TunesmithError
from tunesmith.frontends import hf_args
from tunesmith.frontends.accel import accel_flags, apply_accel
from tunesmith.frontends.flags import FlagParser, ParsedFlags
from tunesmith.frontends.hub import resolve_dataset, resolve_model
from tunesmith.frontends.recipe import (
    COMMON_FLAGS,
    EvalOnly,
    Recipe,
    local_path,
    out_path,
)

# peft's default LoRA targets per model type (what run_lora_clm gets without the flag).
_PEFT_DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"],
}


def parser(script: str) -> FlagParser:
    extra = {"run_clm": hf_args.FROM_SCRATCH + hf_args.CLM,
             "run_mlm": hf_args.FROM_SCRATCH + hf_args.MLM,
             "run_lora_clm": hf_args.LORA}[script]
    return FlagParser(script, [*hf_args.TRAINING, *extra, *hf_args.noted_flags()],
                      extra=[*accel_flags(), *COMMON_FLAGS])


def _parse_overrides(text: str) -> dict[str, Any]:
    """run_clm's --config_overrides "n_embd=10,resid_pdrop=0.2" -> {n_embd: 10, resid_pdrop: 0.2}."""
    out: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise TunesmithError(f"--config_overrides: {item!r} is not key=value")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


def _model(f: ParsedFlags, r: Recipe) -> None:
    name, config, mtype = f["model_name_or_path"], f["config_name"], f.get_given("model_type")
    if name and config and resolve_model(config) != resolve_model(name):
        raise TunesmithError("--config_name with a different --model_name_or_path is not "
                             "supported: the weights' own config is used")
    if name:
        r.set("model.name", resolve_model(name))
    elif config or mtype:
        from tunesmith.models import is_preset

        # An architecture only: a tunesmith preset of that name (gpt2, roberta-base, ...)
        # when there is one, else a config.json path or hub id.
        arch = config or mtype
        r.set("model.name", arch if is_preset(arch) else resolve_model(arch))
        r.set("model.from_scratch", True)
    else:
        raise TunesmithError(f"{r.frontend}: pass --model_name_or_path (fine-tune) or "
                             "--config_name/--model_type with --tokenizer_name (from scratch)")
    overrides = f.get_given("config_overrides")
    if overrides:
        if name:
            raise TunesmithError("--config_overrides only applies when training from scratch "
                                 "(--config_name or --model_type), as in run_clm")
        r.set("model.overrides", _parse_overrides(overrides))
    if f["tokenizer_name"]:
        r.set("model.tokenizer", resolve_model(f["tokenizer_name"]))
    elif not name:
        raise TunesmithError("training from scratch needs --tokenizer_name (run_clm cannot "
                             "train a tokenizer either)")
    if f["trust_remote_code"]:
        r.set("model.trust_remote_code", True)


def _model_config(r: Recipe):
    from tunesmith.models import get_family, resolve_model_config

    family, cfg = resolve_model_config(r.get("model.name"), r.get("model.overrides"))
    return family, cfg, get_family(cfg.model_type)


def _data(f: ParsedFlags, r: Recipe) -> str:
    """data.path / validation_path; returns the data kind (text, alpaca, ...)."""
    kind = "text"
    if f["dataset_name"]:
        if f["train_file"]:
            raise TunesmithError("pass --dataset_name or --train_file, not both")
        d = resolve_dataset(f["dataset_name"], f["dataset_config_name"])
        r.set("data.path", d.path)
        if d.hub and d.dataset_config:
            r.set("data.dataset_config", d.dataset_config)
        if d.validation:
            r.set("data.validation_path", d.validation)
        elif d.hub:
            r.note("--dataset_name", "from the hub, validation is carved from the train split "
                   "(data.validation_split_percentage), not read from its validation split")
        kind = d.kind
    elif f["train_file"]:
        r.set("data.path", local_path(f["train_file"]))
    elif f["do_train"]:
        raise TunesmithError("--do_train needs --dataset_name or --train_file")
    if f["validation_file"]:
        r.set("data.validation_path", local_path(f["validation_file"]))
    if not r.get("data.path") and f["validation_file"]:
        r.set("data.path", r.get("data.validation_path"))  # evaluation only
    if kind == "quotes":  # Abirate/english_quotes: the optimum-tpu guide trains on `quote`
        r.set("data.text_column", "quote")
    return kind


def _data_options(f: ParsedFlags, r: Recipe, max_positions: int) -> None:
    script = r.frontend
    if script != "run_lora_clm":
        block = f["block_size"] if script == "run_clm" else f["max_seq_length"]
        r.set("data.block_size", block or min(1024, max_positions))
        if not r.get("data.validation_path"):
            r.set("data.validation_split_percentage", f["validation_split_percentage"])
        if f["streaming"]:
            r.set("data.streaming", True)
        if not f["keep_linebreaks"]:
            raise TunesmithError("--keep_linebreaks False is not supported: packed text keeps "
                                 "its line breaks (use --line_by_line for one example per line)")
    else:
        r.set("data.block_size", f["max_seq_length"])
        if not r.get("data.validation_path"):
            r.set("data.validation_split_percentage", f["validation_split_percentage"])
    if script == "run_mlm" and f["line_by_line"]:
        r.set("data.mode", "lines")
        if f["pad_to_max_length"]:
            r.set("data.pad_to_multiple_of", r.get("data.block_size"))
    elif f.has("pad_to_max_length"):
        r.note("--pad_to_max_length", "packed blocks are all block_size long; padded batches "
               "are padded to their longest example")
    r.set("data.drop_last", f["dataloader_drop_last"])
    for flag, key in (("max_train_samples", "data.max_train_samples"),
                      ("max_eval_samples", "data.max_eval_samples"),
                      ("preprocessing_num_workers", "data.num_proc")):
        if f[flag] is not None:
            r.set(key, f[flag])


def _task(f: ParsedFlags, r: Recipe, kind: str, family) -> None:
    script = r.frontend
    if script == "run_mlm":
        if family.kind != "masked":
            raise TunesmithError(f"run_mlm needs an encoder (BERT/RoBERTa); {r.get('model.name')} "
                                 "is a causal LM: use run_clm")
        r.set("task", "mlm")
        r.set("mlm.probability", f["mlm_probability"])
        return
    if family.kind == "masked":
        raise TunesmithError(f"{script} needs a causal LM; {r.get('model.name')} is an encoder: "
                             "use run_mlm")
    if script == "run_lora_clm":
        if kind not in ("alpaca", "text"):
            raise TunesmithError(f"run_lora_clm: data set kind {kind!r} is not supported "
                                 "(alpaca-format records: instruction, input, output)")
        r.set("task", "sft")
        r.set("sft.format", "alpaca")
        r.set("sft.train_on_inputs", f["train_on_inputs"])
        r.set("sft.packing", f["dataset_concatenation"])
        r.set("sft.invalid", "skip")
        r.note("run_lora_clm", "alpaca prompts use tunesmith's template (a newline after "
               "'### Response:'); records with an empty output are skipped and counted; with "
               "--dataset_concatenation examples are packed without attending across each other")
    else:
        r.set("task", "clm")


def _optim(f: ParsedFlags, r: Recipe) -> None:
    name = "adafactor" if f["optim"] == "adafactor" else "adamw"
    r.set("optim.name", name)
    r.set("optim.lr", f["learning_rate"])
    r.set("optim.weight_decay", f["weight_decay"])
    if name == "adamw":
        r.set("optim.betas", [f["adam_beta1"], f["adam_beta2"]])
        r.set("optim.eps", f["adam_epsilon"])
        if f["optim"] == "adamw_torch_fused":
            r.set("optim.fused", True)
    sched = f["lr_scheduler_type"]
    r.set("schedule.name", "constant" if sched == "constant_with_warmup" else sched)
    if f["warmup_steps"]:
        r.set("schedule.warmup_steps", f["warmup_steps"])
    elif f["warmup_ratio"]:
        r.set("schedule.warmup_ratio", f["warmup_ratio"])
    else:
        r.set("schedule.warmup_steps", 0)


def _precision(f: ParsedFlags, r: Recipe) -> str:
    dtype = f.get_given("torch_dtype")
    if f["bf16"] and f["fp16"]:
        raise TunesmithError("--bf16 and --fp16 exclude each other")
    if f["bf16"]:
        return "bf16"
    if f["fp16"]:
        return "fp16"
    if dtype == "bfloat16":
        r.note("--torch_dtype", "bfloat16 weights without --bf16 autocast: pure bf16 "
               "(train.precision=bf16-pure)")
        return "bf16-pure"
    if dtype == "float16":
        raise TunesmithError("--torch_dtype float16 without --fp16 (pure fp16 training) is not "
                             "supported: add --fp16, or use bfloat16")
    return "fp32"


def _train(f: ParsedFlags, r: Recipe) -> None:
    r.set("train.seed", f["seed"])
    if f["use_cpu"]:
        r.set("train.device", "cpu")
    r.set("train.precision", _precision(f, r))
    r.set("train.micro_batch_size", f["per_device_train_batch_size"])
    r.set("train.grad_accum_steps", f["gradient_accumulation_steps"])
    r.set("train.epochs", f["num_train_epochs"])
    if f["max_steps"] > 0:
        r.set("train.max_steps", f["max_steps"])
    r.set("train.max_grad_norm", f["max_grad_norm"] or None)
    if f["torch_compile"]:
        r.set("train.compile", True)
    if f["throughput_warmup_steps"] is not None:
        r.set("train.throughput_warmup_steps", f["throughput_warmup_steps"])
    if f["gradient_checkpointing"]:
        r.set("parallel.activation_checkpointing", "full")


def _eval_and_logging(f: ParsedFlags, r: Recipe) -> None:
    r.set("eval.at_end", bool(f["do_eval"]))
    if f["evaluation_strategy"] == "steps":
        r.set("eval.every_steps", f["eval_steps"] or f["logging_steps"])
    r.set("eval.batch_size", f["per_device_eval_batch_size"])
    r.set("logging.steps", f["logging_steps"])
    if f["logging_strategy"] == "no":
        r.note("--logging_strategy", "no: metrics.jsonl is still written every logging.steps")


def _output_and_checkpoints(f: ParsedFlags, r: Recipe) -> None:
    if not f["output_dir"]:
        raise TunesmithError(f"{r.frontend}: --output_dir is required")
    r.set("output.dir", out_path(f["output_dir"]))
    if f["overwrite_output_dir"]:
        r.set("output.overwrite", True)
    strategy = f["save_strategy"]
    if strategy == "steps":
        r.set("checkpoint.every_steps", f["save_steps"])
    elif strategy == "epoch":
        r.set("checkpoint.every_epoch", True)
    if strategy != "no":
        r.set("checkpoint.keep_last", f["save_total_limit"])
    resume = f["resume_from_checkpoint"]
    if resume:
        auto = resume.strip().lower() in ("auto", "true", "yes", "1")
        r.set("checkpoint.resume", "auto" if auto else local_path(resume))


def _parallel(f: ParsedFlags, r: Recipe) -> None:
    if f["deepspeed"]:
        r.set("parallel.deepspeed_config", local_path(f["deepspeed"]))
    if f["fsdp"]:
        words = f["fsdp"].replace(",", " ").split()
        modes = [w for w in words if w in ("full_shard", "shard_grad_op", "hybrid_shard",
                                          "no_shard")]
        if modes:
            r.set("parallel.strategy", modes[0])
        if "offload" in words:
            r.set("parallel.cpu_offload", True)
        r.note("--fsdp", "FSDP2 wraps every transformer block (auto_wrap is implied)")
    if f["ddp_timeout"]:
        r.set("parallel.timeout_s", float(f["ddp_timeout"]))


def _lora(f: ParsedFlags, r: Recipe, model_type: str) -> None:
    r.set("peft.method", "lora")
    r.set("peft.r", f["lora_rank"])
    r.set("peft.alpha", f["lora_alpha"])
    r.set("peft.dropout", f["lora_dropout"])
    targets = f["lora_target_modules"] or _PEFT_DEFAULT_TARGETS.get(model_type)
    r.set("peft.target_modules", targets or "all-linear")


def _eval_only(f: ParsedFlags, r: Recipe) -> EvalOnly:
    if r.frontend == "run_lora_clm":
        raise TunesmithError("run_lora_clm: --do_eval without --do_train is not supported "
                             "(merge the adapter with tunesmith merge, then use run_clm)")
    data = r.get("data.validation_path")
    if data is None:
        raise TunesmithError("--do_eval alone needs a validation split: --validation_file or a "
                             "data set with one")
    batch = f["per_device_eval_batch_size"]
    samples = f["max_eval_samples"]
    return EvalOnly(model=r.get("model.name"), data=data, block_size=r.get("data.block_size"),
                    batch_size=batch, precision=_precision(f, r),
                    device="cpu" if f["use_cpu"] else "auto",
                    max_batches=-(-samples // batch) if samples else None)


def build_recipe(script: str, argv: list[str]) -> tuple[Recipe, ParsedFlags]:
    """Flags of `script` -> the recipe (or the evaluation-only plan) they describe."""
    f = parser(script).parse(argv)
    r = Recipe(script, argv)
    _model(f, r)
    kind = _data(f, r)
    family, model_cfg, _ = _model_config(r)
    from tunesmith.models import usable_positions

    _data_options(f, r, usable_positions(model_cfg))
    if not f["do_train"]:
        if not f["do_eval"]:
            raise TunesmithError(f"{script}: nothing to do: pass --do_train and/or "
                                 "--do_eval")
        r.eval_only = _eval_only(f, r)
        apply_accel(f, r)
        _note_given(f, r)
        return r, f
    _task(f, r, kind, family)
    _optim(f, r)
    _train(f, r)
    _eval_and_logging(f, r)
    _output_and_checkpoints(f, r)
    _parallel(f, r)
    apply_accel(f, r)
    if script == "run_lora_clm":
        _lora(f, r, model_cfg.model_type)
    _note_given(f, r)
    return r, f


def _note_given(f: ParsedFlags, r: Recipe) -> None:
    for name in f.order:
        if name in hf_args.NOTED:
            r.note(f"--{name}", hf_args.NOTED[name][1])
