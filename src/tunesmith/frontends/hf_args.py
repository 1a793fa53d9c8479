"""The flags of Hugging Face's (and optimum-habana's) run_clm.py, run_mlm.py and run_lora_clm.py.

Defaults are the scripts' own (TrainingArguments: lr 5e-5, 3 epochs, batch 8, linear decay,
AdamW betas 0.9/0.999, a checkpoint every 500 steps, fp32 unless --bf16/--fp16), so a command
line means the same run here as there. Flags that have no tunesmith meaning and are not
accelerator-specific (see `accel`) are absent on purpose: they fail with the closest known flag.
"""

from __future__ import annotations

from tunesmith.frontends.flags import Flag

# Accepted, with nothing to do: name -> (kind, note).
NOTED: dict[str, tuple[object, str]] = {
    "cache_dir": (str, "downloads go to the HF cache (HF_HOME); tokenised data to data.cache_dir"),
    "use_fast_tokenizer": (bool, "tunesmith always loads the fast (Rust) tokenizer when one exists"),
    "model_revision": (str, "the default branch is used; pin a revision by downloading it locally"),
    "token": (str, "the hub token is read from HF_TOKEN / huggingface-cli login (never logged)"),
    "use_auth_token": (bool, "the hub token is read from HF_TOKEN / huggingface-cli login"),
    "low_cpu_mem_usage": (bool, "always on: models are built on the meta device and weights "
                                "streamed in one tensor at a time"),
    "load_meta_device": (bool, "always on: models are built on the meta device"),
    "use_cache": (bool, "training never uses a KV cache; generation always does"),
    "overwrite_cache": (bool, "not needed: the tokenisation cache is keyed by file content, "
                              "tokenizer and settings"),
    "keep_in_memory": (bool, "tokenised data is memory-mapped from the cache"),
    "dataset_cache_directory": (str, "tokenised data is cached under data.cache_dir"),
    "dataloader_num_workers": (int, "batches come from memory-mapped token blocks in the main "
                                    "process; workers are not needed"),
    "dataloader_pin_memory": (bool, "batches are copied to CUDA non_blocking"),
    "remove_unused_columns": (bool, "not needed: only token columns are kept"),
    "logging_first_step": (bool, "the progress line shows the first step; metrics.jsonl records "
                                 "every logging.steps"),
    "logging_dir": (str, "metrics go to OUTPUT/metrics.jsonl and OUTPUT/summary.json"),
    "log_level": (str, "use -q for warnings only, --debug for tracebacks"),
    "log_level_replica": (str, "only rank 0 logs progress"),
    "report_to": ("list", "metrics go to OUTPUT/metrics.jsonl; experiment trackers are not "
                          "mapped from this flag"),
    "run_name": (str, "the run is named by its output directory"),
    "data_seed": (int, "data order follows train.seed"),
    "dataset_seed": (int, "data order follows train.seed"),
    "local_rank": (int, "set by the launcher: torchrun gives each rank its device"),
    "ddp_find_unused_parameters": (bool, "not needed: DDP/FSDP2 are set up by tunesmith"),
    "ddp_backend": (str, "parallel.backend picks nccl on CUDA, gloo on CPU"),
    "bf16_full_eval": (bool, "evaluation runs in the training precision"),
    "fp16_full_eval": (bool, "evaluation runs in the training precision"),
    "include_tokens_per_second": (bool, "tokens/s is always in summary.json"),
    "include_num_input_tokens_seen": (bool, "tokens seen are always in metrics.jsonl"),
    "save_safetensors": (bool, "final models are always safetensors"),
    "save_only_model": (bool, "checkpoints always hold the optimizer, for exact resume"),
    "prediction_loss_only": (bool, "evaluation reports loss and perplexity"),
    "skip_memory_metrics": (bool, "peak memory is always in metrics.jsonl"),
    "disable_tqdm": (bool, "the progress bar shows only on a terminal (logging.progress)"),
}

TRAINING = [
    Flag("output_dir", str, None, "-> output.dir"),
    Flag("overwrite_output_dir", bool, False, "-> output.overwrite"),
    Flag("do_train", bool, False, "train (without it: evaluation only)"),
    Flag("do_eval", bool, False, "-> eval.at_end"),
    Flag("evaluation_strategy", str, "no", "steps -> eval.every_steps", ("no", "steps"),
         aliases=("eval_strategy",)),
    Flag("eval_steps", int, None, "-> eval.every_steps (default: --logging_steps)"),
    Flag("per_device_train_batch_size", int, 8, "-> train.micro_batch_size"),
    Flag("per_device_eval_batch_size", int, 8, "-> eval.batch_size"),
    Flag("gradient_accumulation_steps", int, 1, "-> train.grad_accum_steps"),
    Flag("learning_rate", float, 5e-5, "-> optim.lr"),
    Flag("weight_decay", float, 0.0, "-> optim.weight_decay"),
    Flag("adam_beta1", float, 0.9, "-> optim.betas[0]"),
    Flag("adam_beta2", float, 0.999, "-> optim.betas[1]"),
    Flag("adam_epsilon", float, 1e-8, "-> optim.eps"),
    Flag("max_grad_norm", float, 1.0, "-> train.max_grad_norm (0: no clipping)"),
    Flag("num_train_epochs", int, 3, "-> train.epochs (whole epochs)"),
    Flag("max_steps", int, -1, "-> train.max_steps"),
    Flag("lr_scheduler_type", str, "linear", "-> schedule.name",
         ("linear", "cosine", "constant", "constant_with_warmup")),
    Flag("warmup_ratio", float, 0.0, "-> schedule.warmup_ratio"),
    Flag("warmup_steps", int, 0, "-> schedule.warmup_steps"),
    Flag("logging_strategy", str, "steps", "steps/no (metrics.jsonl is always written)",
         ("no", "steps")),
    Flag("logging_steps", int, 500, "-> logging.steps"),
    Flag("save_strategy", str, "steps", "steps -> checkpoint.every_steps, epoch -> "
         "checkpoint.every_epoch", ("no", "steps", "epoch")),
    Flag("save_steps", int, 500, "-> checkpoint.every_steps"),
    Flag("save_total_limit", int, None, "-> checkpoint.keep_last"),
    Flag("resume_from_checkpoint", str, None, "-> checkpoint.resume (a path, or auto)"),
    Flag("seed", int, 42, "-> train.seed"),
    Flag("bf16", bool, False, "-> train.precision=bf16"),
    Flag("fp16", bool, False, "-> train.precision=fp16"),
    Flag("optim", str, "adamw_torch", "-> optim.name",
         ("adamw_torch", "adamw_hf", "adamw_torch_fused", "adafactor")),
    Flag("gradient_checkpointing", bool, False, "-> parallel.activation_checkpointing=full"),
    Flag("dataloader_drop_last", bool, False, "-> data.drop_last"),
    Flag("use_cpu", bool, False, "-> train.device=cpu", aliases=("no_cuda",)),
    Flag("torch_compile", bool, False, "-> train.compile"),
    Flag("deepspeed", str, None, "-> parallel.deepspeed_config (ZeRO stage -> strategy)"),
    Flag("fsdp", str, None, "full_shard/shard_grad_op/hybrid_shard/offload -> parallel.*"),
    Flag("ddp_timeout", int, None, "-> parallel.timeout_s"),
    Flag("throughput_warmup_steps", int, None, "-> train.throughput_warmup_steps"),
    Flag("max_train_samples", int, None, "-> data.max_train_samples"),
    Flag("max_eval_samples", int, None, "-> data.max_eval_samples"),
    Flag("preprocessing_num_workers", int, None, "-> data.num_proc"),
    Flag("dataset_name", str, None, "hub name (local mirror: TUNESMITH_DATASETS) or path -> data.path"),
    Flag("dataset_config_name", str, None, "-> data.dataset_config"),
    Flag("train_file", str, None, "-> data.path"),
    Flag("validation_file", str, None, "-> data.validation_path"),
    Flag("trust_remote_code", bool, False, "-> model.trust_remote_code"),
    Flag("tokenizer_name", str, None, "-> model.tokenizer"),
    Flag("config_name", str, None, "train from scratch with this config -> model.name"),
    Flag("model_name_or_path", str, None, "pretrained weights -> model.name"),
]

# run_clm.py / run_mlm.py model arguments beyond the shared ones.
FROM_SCRATCH = [
    Flag("model_type", str, None, "train from scratch with this architecture -> model.name"),
    Flag("config_overrides", str, None, "k=v,k=v -> model.overrides (with --model_type/"
         "--config_name)"),
    Flag("torch_dtype", str, None, "bfloat16 (without --bf16) -> train.precision=bf16-pure",
         ("auto", "bfloat16", "float16", "float32")),
    Flag("streaming", bool, False, "-> data.streaming (needs --max_steps)"),
    Flag("validation_split_percentage", int, 5, "-> data.validation_split_percentage"),
    Flag("keep_linebreaks", bool, True, "line breaks of .txt files are kept (run_clm default)"),
]

CLM = [Flag("block_size", int, None, "-> data.block_size (default min(1024, model positions))")]

MLM = [
    Flag("max_seq_length", int, None, "-> data.block_size (default min(1024, model positions))"),
    Flag("mlm_probability", float, 0.15, "-> mlm.probability"),
    Flag("line_by_line", bool, False, "-> data.mode=lines"),
    Flag("pad_to_max_length", bool, False, "with --line_by_line: pad every batch to "
         "max_seq_length (data.pad_to_multiple_of)"),
]

LORA = [
    Flag("max_seq_length", int, 512, "-> data.block_size"),
    Flag("validation_split_percentage", int, 0, "-> data.validation_split_percentage"),
    Flag("dataset_concatenation", bool, False, "-> sft.packing (examples never attend "
         "across each other)"),
    Flag("pad_to_max_length", bool, False, "batches are padded to their longest example"),
    Flag("lora_rank", int, 8, "-> peft.r"),
    Flag("lora_alpha", float, 16.0, "-> peft.alpha"),
    Flag("lora_dropout", float, 0.05, "-> peft.dropout"),
    Flag("lora_target_modules", "list", None, "-> peft.target_modules (default: peft's for the "
         "model type)"),
    Flag("train_on_inputs", bool, True, "-> sft.train_on_inputs"),
]


def noted_flags(names: tuple[str, ...] | None = None) -> list[Flag]:
    return [Flag(n, kind, False if kind is bool else None, why)
            for n, (kind, why) in NOTED.items() if names is None or n in names]
