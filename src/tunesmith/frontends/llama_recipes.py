"""`tunesmith llama-recipes`: llama-recipes' finetuning config fields as flags -> recipe.

`python -m llama_recipes.finetuning --use_peft --peft_method lora --quantization --model_name
PATH --output_dir PATH` becomes `tunesmith llama-recipes --use_peft --peft_method lora ...`.
Fields of its train_config, fsdp_config, lora_config and dataset configs are accepted bare
(`--pure_bf16`) or prefixed (`--fsdp_config.pure_bf16`), with its defaults (lr 1e-4, 3 epochs,
batch 4, StepLR gamma 0.85 per epoch, packing to 4096 tokens, LoRA r 8 / alpha 32 on q_proj and
v_proj, FSDP activation checkpointing on).
"""

from __future__ import annotations

from tunesmith.errors import TunesmithError
from tunesmith.frontends.accel import accel_flags, apply_accel
from tunesmith.frontends.flags import Flag, FlagParser, ParsedFlags
from tunesmith.frontends.hub import resolve_dataset, resolve_model
from tunesmith.frontends.recipe import COMMON_FLAGS, Recipe, local_path, out_path

_SHARDING = {"FULL_SHARD": "full_shard", "SHARD_GRAD_OP": "shard_grad_op",
             "NO_SHARD": "no_shard", "HYBRID_SHARD": "hybrid_shard", "_HYBRID_SHARD_ZERO2": "hybrid_shard"}
_CUSTOM = "--dataset custom_dataset --custom_dataset.file FILE"
_FORMATS = ("alpaca", "dolly", "chat", "sharegpt", "summarization", "custom")
_WANDB_OPTIONS = ("job_type", "group", "notes", "mode")  # wandb_config fields passed to wandb.init
_PROFILER_DIR = "PATH/to/save/profiler/results"  # llama-recipes' placeholder default


def _f(name: str, kind, default, help: str, choices=None, section: str = "train_config") -> Flag:
    return Flag(name, kind, default, help, choices, aliases=(f"{section}.{name}",))


FLAGS = [
    _f("model_name", str, None, "-> model.name"),
    _f("tokenizer_name", str, None, "-> model.tokenizer"),
    _f("output_dir", str, None, "-> output.dir"),
    _f("enable_fsdp", bool, False, "FSDP2 with fsdp_config.sharding_strategy -> parallel.strategy"),
    _f("run_validation", bool, True, "-> eval.at_end"),
    _f("batch_size_training", int, 4, "-> train.micro_batch_size"),
    _f("batching_strategy", str, "packing", "packing -> sft.packing", ("packing", "padding")),
    _f("context_length", int, 4096, "-> data.block_size"),
    _f("gradient_accumulation_steps", int, 1, "-> train.grad_accum_steps"),
    _f("gradient_clipping", bool, False, "-> train.max_grad_norm (else none)"),
    _f("gradient_clipping_threshold", float, 1.0, "-> train.max_grad_norm"),
    _f("num_epochs", int, 3, "-> train.epochs"),
    _f("max_train_step", int, 0, "-> train.max_steps (0: none)"),
    _f("max_eval_step", int, 0, "-> eval.max_batches (0: none)"),
    _f("lr", float, 1e-4, "-> optim.lr"),
    _f("weight_decay", float, 0.0, "-> optim.weight_decay"),
    _f("gamma", float, 0.85, "-> schedule.name=step, schedule.gamma (per epoch)"),
    _f("seed", int, 42, "-> train.seed"),
    _f("use_fp16", bool, False, "-> train.precision=fp16"),
    _f("mixed_precision", bool, True, "-> train.precision=bf16 (else fp32)"),
    _f("pure_bf16", bool, False, "-> train.precision=bf16-pure"),
    _f("val_batch_size", int, 1, "-> eval.batch_size"),
    _f("dataset", str, "samsum_dataset", "samsum/alpaca/custom -> task sft, sft.format, data.path",
       ("samsum_dataset", "alpaca_dataset", "custom_dataset", "grammar_dataset")),
    _f("use_peft", bool, False, "-> peft.method (from --peft_method)"),
    _f("peft_method", str, "lora", "lora / llama_adapter -> peft.method", ("lora", "llama_adapter",
                                                                           "prefix")),
    _f("from_peft_checkpoint", str, "", "-> peft.from_checkpoint"),
    _f("freeze_layers", bool, False, "with num_freeze_layers -> peft.num_freeze_layers"),
    _f("num_freeze_layers", int, 1, "-> peft.num_freeze_layers"),
    _f("quantization", "opt", None, "true/4bit/8bit -> peft.method=qlora (NF4 4-bit base)"),
    _f("save_model", bool, True, "-> output.save_final"),
    _f("sharding_strategy", str, "FULL_SHARD", "-> parallel.strategy", tuple(_SHARDING),
       section="fsdp_config"),
    _f("hsdp", bool, False, "-> parallel.strategy=hybrid_shard", section="fsdp_config"),
    _f("replica_group_size", int, 0, "-> parallel.dp_replicate", section="fsdp_config"),
    _f("sharding_group_size", int, 0, "-> parallel.dp_shard", section="fsdp_config"),
    _f("checkpoint_type", str, "SHARDED_STATE_DICT", "see note", ("FULL_STATE_DICT",
       "SHARDED_STATE_DICT", "StateDictType.FULL_STATE_DICT",
       "StateDictType.SHARDED_STATE_DICT"), section="fsdp_config"),
    _f("fsdp_activation_checkpointing", bool, True, "with enable_fsdp -> "
       "parallel.activation_checkpointing=full", section="fsdp_config"),
    _f("fsdp_cpu_offload", bool, False, "-> parallel.cpu_offload", section="fsdp_config"),
    _f("optimizer", str, "AdamW", "AdamW (anyprecision: pure_bf16 keeps states in bf16)",
       ("AdamW", "anyprecision"), section="fsdp_config"),
    _f("r", int, 8, "-> peft.r", section="lora_config"),
    _f("lora_alpha", float, 32.0, "-> peft.alpha", section="lora_config"),
    _f("lora_dropout", float, 0.05, "-> peft.dropout", section="lora_config"),
    _f("target_modules", "list", ["q_proj", "v_proj"], "-> peft.target_modules",
       section="lora_config"),
    _f("adapter_len", int, 10, "-> peft.adapter_len", section="llama_adapter_config"),
    _f("adapter_layers", int, 30, "-> peft.adapter_layers", section="llama_adapter_config"),
    _f("use_wandb", bool, False, "-> logging.trackers: [wandb]"),
    _f("project", str, "llama_recipes", "-> logging.project", section="wandb_config"),
    _f("entity", str, None, "-> logging.entity", section="wandb_config"),
    _f("tags", "list", None, "-> logging.tags", section="wandb_config"),
    *[_f(k, str, None, f"-> logging.tracker_options.wandb.{k}", section="wandb_config")
      for k in _WANDB_OPTIONS],
    _f("flop_counter", bool, False, "-> profile.count_flops"),
    _f("flop_counter_start", int, 3, "-> profile.flop_counter_start"),
    _f("use_profiler", bool, False, "-> profile.wait=1, warmup=2, active=3 (llama-recipes' "
       "schedule), with shapes, stacks and memory"),
    _f("profiler_dir", str, _PROFILER_DIR, "-> profile.dir"),
    Flag("alpaca_dataset.data_path", str, None, "alpaca JSON file -> data.path"),
    Flag("custom_dataset.file", str, None, "a JSON/JSONL/CSV data file (not a .py) -> data.path"),
    Flag("custom_dataset.format", str, "alpaca", "-> sft.format", _FORMATS),
    Flag("custom_dataset.prompt_template", str, None, "-> sft.prompt_template"),
    Flag("custom_dataset.response_template", str, None, "-> sft.response_template"),
]

# Accepted, nothing to do (or done by default): name -> note.
NOTED = {
    "low_cpu_fsdp": "always on: the model is built on the meta device and each rank streams in "
                    "its own shards",
    "num_workers_dataloader": "batches come from memory-mapped token blocks; no workers needed",
    "one_gpu": "one process unless launched with torchrun / tunesmith launch",
    "use_fast_kernels": "always on: SDPA picks flash / memory-efficient attention kernels",
    "dist_checkpoint_root_folder": "checkpoints go to OUTPUT/checkpoints (DCP, reshardable), the "
                                   "final model to OUTPUT/final",
    "dist_checkpoint_folder": "checkpoints go to OUTPUT/checkpoints, the final model to OUTPUT/final",
    "save_optimizer": "training checkpoints always hold the optimizer state",
    "save_metrics": "always on: OUTPUT/metrics.jsonl (a record every logging.steps steps and "
                    "per evaluation), OUTPUT/summary.json, and the charts in OUTPUT/report.html",
    "samsum_dataset.trust_remote_code": "hub data sets are read without remote code",
}
_NOTED_KINDS = {"num_workers_dataloader": int, "dist_checkpoint_root_folder": str,
                "dist_checkpoint_folder": str}


def parser(name: str = "llama-recipes") -> FlagParser:
    noted = [Flag(n, _NOTED_KINDS.get(n, bool), None, why) for n, why in NOTED.items()]
    return FlagParser(name, FLAGS + noted, extra=[*accel_flags(), *COMMON_FLAGS])


def _dataset(f: ParsedFlags, r: Recipe) -> None:
    name = f["dataset"]
    r.set("task", "sft")
    if name == "samsum_dataset":
        d = resolve_dataset("Samsung/samsum", None, "--dataset samsum_dataset", _CUSTOM)
        r.set("data.path", d.path)
        if d.validation:
            r.set("data.validation_path", d.validation)
        r.set("sft.format", "summarization")
    elif name == "alpaca_dataset":
        given = f["alpaca_dataset.data_path"]
        path = local_path(given) if given else resolve_dataset(
            "tatsu-lab/alpaca", None, "--dataset alpaca_dataset", "--alpaca_dataset.data_path").path
        r.set("data.path", path)
        r.set("sft.format", "alpaca")
        # Alpaca has records with an empty output (record 285 of the real file): llama-recipes
        # keeps them with the EOS as their only target; the default sft.invalid=error would stop
        # the run on the first one, so they are skipped and counted, as run_lora_clm does.
        r.set("sft.invalid", "skip")
        r.note("--dataset alpaca_dataset", "validation is data.validation_split_percentage of "
               "the records (llama-recipes holds out the first 200); records with an empty "
               "output are skipped and counted (llama-recipes trains them on the EOS alone)")
    elif name == "custom_dataset":
        _custom(f, r)
    else:
        raise TunesmithError(f"--dataset {name} is not supported (samsum_dataset, "
                             "alpaca_dataset, custom_dataset)")
    packing = f["batching_strategy"] == "packing"
    r.set("sft.packing", packing)
    r.set("data.block_size", f["context_length"])
    if packing:
        r.note("--batching_strategy", "packing: examples share rows but never attend across "
               "each other (llama-recipes concatenates them)")


def _custom(f: ParsedFlags, r: Recipe) -> None:
    file = f["custom_dataset.file"]
    if not file:
        raise TunesmithError("--dataset custom_dataset needs --custom_dataset.file (a JSON, "
                             "JSONL or CSV data file)")
    if file.split(":")[0].endswith(".py"):
        raise TunesmithError(f"--custom_dataset.file {file}: tunesmith does not run dataset "
                             "code; write the records to JSON/JSONL and set "
                             "--custom_dataset.format (alpaca, dolly, chat, ...)")
    r.set("data.path", local_path(file))
    r.set("sft.format", f["custom_dataset.format"])
    for key in ("prompt_template", "response_template"):
        if f[f"custom_dataset.{key}"]:
            r.set(f"sft.{key}", f[f"custom_dataset.{key}"])


def _precision(f: ParsedFlags) -> str:
    if f["pure_bf16"]:
        return "bf16-pure"
    if f["use_fp16"]:
        return "fp16"
    return "bf16" if f["mixed_precision"] else "fp32"


def _train(f: ParsedFlags, r: Recipe) -> None:
    r.set("optim.name", "adamw")
    r.set("optim.lr", f["lr"])
    r.set("optim.weight_decay", f["weight_decay"])
    r.set("optim.betas", [0.9, 0.999])
    r.set("schedule.name", "step")
    r.set("schedule.gamma", f["gamma"])
    r.set("train.seed", f["seed"])
    r.set("train.precision", _precision(f))
    r.set("train.micro_batch_size", f["batch_size_training"])
    r.set("train.grad_accum_steps", f["gradient_accumulation_steps"])
    r.set("train.epochs", f["num_epochs"])
    if f["max_train_step"] > 0:
        r.set("train.max_steps", f["max_train_step"])
    r.set("train.max_grad_norm", f["gradient_clipping_threshold"] if f["gradient_clipping"]
          else None)
    r.set("eval.at_end", f["run_validation"])
    if f["run_validation"]:
        r.note("--run_validation", "evaluates at the end of training (llama-recipes: after each "
               "epoch); set eval.every_steps for more")
    r.set("eval.batch_size", f["val_batch_size"])
    if f["max_eval_step"] > 0:
        r.set("eval.max_batches", f["max_eval_step"])


def _fsdp(f: ParsedFlags, r: Recipe) -> None:
    if not f["enable_fsdp"]:
        return
    strategy = "hybrid_shard" if f["hsdp"] else _SHARDING[f["sharding_strategy"]]
    r.set("parallel.strategy", strategy)
    if f["hsdp"] and f["replica_group_size"]:
        r.set("parallel.dp_replicate", f["replica_group_size"])
    if f["hsdp"] and f["sharding_group_size"]:
        r.set("parallel.dp_shard", f["sharding_group_size"])
    if f["fsdp_activation_checkpointing"]:
        r.set("parallel.activation_checkpointing", "full")
    if f["fsdp_cpu_offload"]:
        r.set("parallel.cpu_offload", True)
    r.note("--checkpoint_type", "both kinds are written: OUTPUT/final is a full HF state dict; "
           "training checkpoints are sharded DCP that reshard to any world size")


def _peft(f: ParsedFlags, r: Recipe) -> None:
    quant = f["quantization"]
    quantized = quant not in (None, False) and str(quant).lower() not in ("false", "0", "no")
    if f["freeze_layers"]:
        r.set("peft.num_freeze_layers", f["num_freeze_layers"])
    if not f["use_peft"]:
        if quantized:
            raise TunesmithError("--quantization needs --use_peft (a quantized base is frozen; "
                                 "only adapters train)")
        return
    method = f["peft_method"]
    if method == "prefix":
        raise TunesmithError("--peft_method prefix is not supported (lora, llama_adapter)")
    if method == "llama_adapter":
        _llama_adapter(f, r)
        return
    r.set("peft.method", "qlora" if quantized else "lora")
    if quantized:
        r.note("--quantization", "the frozen base is stored in 4-bit NF4 (QLoRA via torchao); "
               "there is no 8-bit path")
    r.set("peft.r", f["r"])
    r.set("peft.alpha", f["lora_alpha"])
    r.set("peft.dropout", f["lora_dropout"])
    r.set("peft.target_modules", f["target_modules"])
    if f["from_peft_checkpoint"]:
        r.set("peft.from_checkpoint", local_path(f["from_peft_checkpoint"]))


def _llama_adapter(f: ParsedFlags, r: Recipe) -> None:
    r.set("peft.method", "llama_adapter")
    r.set("peft.adapter_len", f["adapter_len"])
    r.set("peft.adapter_layers", f["adapter_layers"])


def _observe(f: ParsedFlags, r: Recipe) -> None:
    """W&B, the FLOP counter and the profiler."""
    if f["use_wandb"]:
        r.set("logging.trackers", ["wandb"])
        r.set("logging.project", f["project"])
        if f["entity"]:
            r.set("logging.entity", f["entity"])
        if f["tags"]:
            r.set("logging.tags", f["tags"])
        options = {k: f[k] for k in _WANDB_OPTIONS if f[k] is not None}
        if options:
            r.set("logging.tracker_options", {"wandb": options})
    elif any(f.has(k) for k in ("project", "entity", "tags", *_WANDB_OPTIONS)):
        r.note("wandb_config", "ignored without --use_wandb (as in llama-recipes)")
    if f["flop_counter"]:
        r.set("profile.count_flops", True)
        r.set("profile.flop_counter_start", f["flop_counter_start"])
        r.note("--flop_counter", "one step's FLOPs go to summary.json (measured_tflops_per_step, "
               "achieved_tflops_per_s); that step runs eagerly and is left out of tokens/s")
    if f["use_profiler"]:
        # llama-recipes' profiler: schedule(wait=1, warmup=2, active=3), shapes, stacks, memory.
        for key, value in (("wait", 1), ("warmup", 2), ("active", 3), ("record_shapes", True),
                           ("with_stack", True), ("profile_memory", True)):
            r.set(f"profile.{key}", value)
        if f["profiler_dir"] != _PROFILER_DIR:
            r.set("profile.dir", out_path(f["profiler_dir"]))
        r.note("--use_profiler", "traces optimizer steps 4-6 (llama-recipes counts batches) into "
               "profile.dir as Chrome-trace JSON, with a top-kernels summary")
        if f["flop_counter"]:
            r.note("--flop_counter", "with --use_profiler both run (llama-recipes refuses the "
                   "pair): the counted step is the first one after the traced steps")
    elif f.has("profiler_dir"):
        r.note("--profiler_dir", "ignored without --use_profiler (as in llama-recipes)")


def build_recipe(name: str, argv: list[str]) -> tuple[Recipe, ParsedFlags]:
    """llama-recipes fields -> the recipe they describe (always an SFT task)."""
    f = parser(name).parse(argv)
    r = Recipe(name, argv)
    if not f["model_name"]:
        raise TunesmithError("llama-recipes: --model_name is required (a local HF model "
                             "directory or hub id)")
    r.set("model.name", resolve_model(f["model_name"]))
    if f["tokenizer_name"]:
        r.set("model.tokenizer", resolve_model(f["tokenizer_name"]))
    _dataset(f, r)
    _train(f, r)
    if not f["output_dir"] or f["output_dir"].startswith("PATH/to"):
        raise TunesmithError("llama-recipes: --output_dir is required")
    r.set("output.dir", out_path(f["output_dir"]))
    r.set("output.save_final", f["save_model"])
    _fsdp(f, r)
    _observe(f, r)
    apply_accel(f, r)
    _peft(f, r)
    for flag in f.order:
        if flag in NOTED:
            r.note(f"--{flag}", NOTED[flag])
    return r, f
