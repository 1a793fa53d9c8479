"""The typed run configuration.

One `RunConfig` describes a whole job. Every section rejects unknown keys (`extra="forbid"`),
and cross-field rules that can be checked without touching data or weights are checked here,
so an impossible run fails before any work starts.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any, Literal, get_args

from pydantic import Field, field_validator, model_validator

from tunesmith.config.observe import LoggingConfig, ProfileConfig, TrackerName  # noqa: F401 (re-exported)
from tunesmith.config.section import Section
from tunesmith.config.tasks import DPOConfig, GenerateEvalConfig, MLMConfig, SFTConfig

# The one list of precisions: the config's literal and the CLI's choices.
Precision = Literal["fp32", "bf16", "fp16", "bf16-pure"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


class ModelConfig(Section):
    name: str = Field(
        "tiny",
        description="Preset name (tiny, llama3.2-1b, llama3-8b, llama2-7b, ...), a local HF "
        "directory or config.json, or a hub id.",
    )
    from_scratch: bool = Field(
        False,
        description="Random init from the config instead of loading weights. Presets and bare "
        "config.json files are always from scratch.",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Config fields to override, e.g. {n_layers: 4, dim: 256} (ours or HF names).",
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer path or hub id; defaults to model.name when it has one."
    )
    trust_remote_code: bool = Field(
        False, description="Allow code from the hub when loading tokenizers. Off by default."
    )
    allow_unsafe_pickle: bool = Field(
        False,
        description="Allow pickle (.bin/.pt) weights that need arbitrary code to load; only for "
        "sources you trust. safetensors and plain-tensor pickles never need it.",
    )


class DataConfig(Section):
    path: str | None = Field(
        None,
        description="Training data: a .txt/.json/.jsonl/.csv/.parquet file, a directory of them, "
        "or a HF dataset name (online only).",
    )
    dataset_config: str | None = Field(None, description="HF dataset config name.")
    split: str = Field("train", description="Split to read from a HF dataset.")
    validation_path: str | None = Field(None, description="Explicit validation file.")
    validation_split_percentage: float = Field(
        5.0, ge=0, lt=100, description="Held-out share of the training data when no validation_path."
    )
    text_column: str = Field("text", description="Column holding the text in json/csv/parquet.")
    mode: Literal["packed", "lines"] = Field(
        "packed",
        description="packed: concatenate and cut into block_size blocks; lines: one example per "
        "line/record, padded per batch.",
    )
    block_size: int = Field(512, gt=0, description="Tokens per training example.")
    pad_to_multiple_of: int | None = Field(
        None, gt=0, description="lines mode, unpacked sft and dpo: pad each batch to a multiple of "
        "this (default: the longest row; 64 for sft/dpo under train.compile, so compiled blocks see "
        "few distinct lengths)."
    )
    add_eos: bool = Field(True, description="Append EOS after each document/line.")
    num_proc: int = Field(1, ge=1, description="Processes used for tokenisation.")
    cache_dir: str | None = Field(None, description="Tokenisation cache (default: HF datasets').")
    drop_last: bool = Field(True, description="Drop the last incomplete batch of an epoch.")
    max_train_samples: int | None = Field(None, gt=0, description="Truncate the training set.")
    max_eval_samples: int | None = Field(None, gt=0, description="Truncate the validation set.")
    streaming: bool = Field(
        False, description="Read training data lazily (local files or a hub dataset) instead "
        "of tokenizing it up front; needs train.max_steps. Resumable, sharded over ranks.",
    )
    shuffle_buffer: int = Field(
        10000, ge=0, description="streaming: records held for shuffling (0 = stream order).",
    )
    csv_bad_rows: Literal["error", "skip"] = Field(
        "error", description="A CSV row whose field count differs from the header's: error "
        "(names file:line) or skip (left out; the count is logged per file).",
    )

    @property
    def skip_bad_rows(self) -> bool:
        return self.csv_bad_rows == "skip"


class OptimConfig(Section):
    name: Literal["adamw", "adafactor", "adamw8bit", "adamw4bit"] = Field(
        "adamw",
        description="adamw8bit / adamw4bit: AdamW with its two moments stored in 8 / 4 bits "
        "(torchao; 2 / 1 bytes per parameter instead of 8). See docs/lowmem.md.",
    )
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    fused: bool | None = Field(None, description="Fused AdamW kernel; default: on for CUDA.")
    bf16_stochastic_round: bool | None = Field(
        None,
        description="Round each update of bf16 weights stochastically (torchao), so updates "
        "smaller than bf16's spacing are not lost without fp32 master weights. Needs "
        "train.precision=bf16-pure; default: on for adamw8bit/adamw4bit with bf16-pure.",
    )
    in_backward: bool = Field(
        False,
        description="Step each parameter as soon as its gradient is complete and free that gradient, "
        "so whole-model gradients never coexist (saves their memory). One process; needs "
        "train.max_grad_norm=null, grad_accum_steps=1, nan_policy=halt. See docs/performance.md.",
    )


class ScheduleConfig(Section):
    name: Literal["constant", "linear", "cosine", "step"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Used when warmup_steps is 0.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Floor of linear/cosine decay.")
    gamma: float = Field(0.85, gt=0, description="step: multiply lr by gamma each epoch.")


class TrainConfig(Section):
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Precision = Field(
        "bf16",
        description="bf16: fp32 weights + bf16 autocast; fp16: autocast + grad scaler; bf16-pure: "
        "bf16 weights and optimizer state; fp32: none. bf16/fp16 fall back to fp32 on CPU "
        "unless the device supports them.",
    )
    residual_dtype: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="dtype of the residual stream between blocks under precision=bf16 (native "
        "Llama-family and Gemma 3 models): fp32 (default; what autocast over fp32 weights gives, as in HF "
        "Trainer) or bf16 (as in torchtitan and Megatron: half the memory traffic of the norms and "
        "residual adds; see docs/performance.md).",
    )
    router_aux_loss_coef: float | None = Field(
        None, ge=0,
        description="MoE models (mixtral, qwen3_moe): add coef x the router load-balancing loss "
        "(HF's load_balancing_loss_func, each micro-batch's over its tokens) to the training loss; "
        "null: off, as HF without output_router_logits. The published configs record 0.02 "
        "(Mixtral) and 0.001 (Qwen3-MoE). Logged as router_aux_loss (docs/tasks.md).",
    )
    micro_batch_size: int = Field(8, gt=0)
    grad_accum_steps: int = Field(1, gt=0)
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global grad norm.")
    compile: bool = Field(False, description="torch.compile each transformer block.")
    compile_options: dict[str, Any] = Field(
        default_factory=dict,
        description="torch.compile options for the compiled blocks: TorchInductor config keys, e.g. "
        "{coordinate_descent_tuning: true} (default: none; see docs/performance.md).",
    )
    float8: Literal["none", "tensorwise", "rowwise", "rowwise_with_gw_hp"] = Field(
        "none",
        description="float8 training (torchao) of the chosen linear layers: tensorwise (fastest), "
        "rowwise, or rowwise_with_gw_hp (weight gradient in bf16). Needs a CUDA GPU with float8 "
        "(compute capability >= 8.9) and precision bf16 or bf16-pure. See docs/lowmem.md.",
    )
    float8_filter: Literal["auto", "all"] = Field(
        "auto",
        description="Which linear layers train in float8: auto: those whose shapes gain (torchao's "
        "thresholds for the recipe); all: every one whose dims are multiples of 16. Either way "
        "minus train.float8_skip.",
    )
    float8_skip: list[str] = Field(
        default_factory=lambda: ["output"],
        description="Linear layers kept in bf16: module-name globs (ours, e.g. output, "
        "layers.0.*, *.w2). Default: the LM head; without it (e.g. []) and with float8=tensorwise "
        "the fused loss runs the head's matmuls in float8 too (docs/lowmem.md).",
    )
    float8_all_gather: bool = Field(
        False,
        description="FSDP2 with float8=tensorwise: all-gather the weights already cast to float8 "
        "(half the bytes of bf16); their scales are recomputed once per optimizer step.",
    )
    throughput_warmup_steps: int = Field(
        2, ge=0, description="Steps left out of throughput/MFU (compile, allocator warm-up)."
    )
    nan_policy: Literal["halt", "skip"] = Field(
        "halt",
        description="On a non-finite loss or grad norm the update is never applied. halt: write "
        "OUTPUT/nan_diagnostics.json and stop (exit 3); skip: drop the step and continue.",
    )
    max_consecutive_skips: int = Field(
        5, ge=1, description="nan_policy=skip: halt (exit 3) when more consecutive steps than this "
        "are non-finite.",
    )


class EvalConfig(Section):
    every_steps: int | None = Field(None, gt=0, description="Evaluate every N optimizer steps.")
    at_start: bool = Field(False, description="Evaluate before training.")
    at_end: bool = True
    batch_size: int | None = Field(None, gt=0, description="Default: train.micro_batch_size.")
    max_batches: int | None = Field(None, gt=0)
    generate: GenerateEvalConfig = Field(default_factory=GenerateEvalConfig)


class OutputConfig(Section):
    dir: str = Field("outputs/run", description="Output directory.")
    overwrite: bool = Field(False, description="Allow reusing a directory holding another run.")
    save_final: bool = Field(True, description="Write an HF-format model to OUTPUT/final.")


class CheckpointConfig(Section):
    every_steps: int | None = Field(
        None, gt=0, description="Save a training checkpoint every N optimizer steps."
    )
    every_epoch: bool = Field(False, description="Save a training checkpoint at the end of each epoch.")
    keep_last: int | None = Field(
        3, ge=1, description="Complete checkpoints to keep (older ones are deleted); null keeps all."
    )
    resume: str | None = Field(
        None,
        description="Resume from: auto (newest valid checkpoint in output.dir, else start fresh), "
        "a checkpoint directory, or a step number.",
    )
    save_on_exit: bool = Field(
        True, description="On SIGTERM/SIGINT, save a checkpoint at the next step boundary, then exit 0."
    )
    verify: Literal["sha256", "size", "none"] = Field(
        "sha256",
        description="Integrity data in each manifest, checked before resuming: sha256 (size and "
        "content hash), size, or none (files must exist).",
    )

    @field_validator("resume", mode="before")
    @classmethod
    def _resume_text(cls, value: object) -> object:
        # `checkpoint.resume=200` parses as an int; a step number is meant.
        if isinstance(value, bool):
            raise ValueError("must be auto, a checkpoint path or a step number")
        if isinstance(value, int):
            if value < 0:
                raise ValueError("a step number must be >= 0")
            return str(value)
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @property
    def periodic(self) -> bool:
        """True when checkpoints are saved during training (not only on preemption)."""
        return self.every_steps is not None or self.every_epoch


class ParallelConfig(Section):
    """Multi-process layout: degrees of the device mesh and how parameters are spread over it.

    The mesh is (dp_replicate, dp_shard, cp, tp) and must multiply to the world size (nnodes x
    nproc-per-node). -1 means "fill": the degree is chosen by the strategy (see
    `tunesmith.parallel.layout`). With one process every setting is inert except
    activation_checkpointing.
    """

    strategy: Literal["auto", "full_shard", "shard_grad_op", "no_shard", "hybrid_shard"] = Field(
        "auto",
        description="full_shard: FSDP2, params resharded after forward; shard_grad_op: kept "
        "unsharded from forward to backward; no_shard: DDP (replicated); hybrid_shard: shard "
        "within a node, replicate across nodes (HSDP); auto: full_shard, or hybrid_shard when "
        "dp_replicate > 1.",
    )
    dp_replicate: int = Field(-1, description="Replicated data-parallel degree (-1: fill).")
    dp_shard: int = Field(-1, description="Sharded data-parallel degree (-1: fill).")
    tp: int = Field(1, ge=1, description="Tensor-parallel degree (ranks of one node).")
    cp: int = Field(
        1, ge=1, description="Context-parallel degree: each sequence is split over cp ranks (rank i "
        "holds chunks i and 2cp-1-i of 2cp) and attention runs as ring attention over them; FSDP2 "
        "shards parameters over dp_shard x cp. Llama-family, MoE and Gemma 3 models, packed rows (data.mode=packed "
        "or sft.packing), data.block_size a multiple of 2cp.",
    )
    ep: int = Field(
        1, ge=1, description="Expert-parallel degree (MoE models): each group of ep data-parallel "
        "ranks splits every layer's experts between them (E/ep each) and exchanges tokens with "
        "all-to-all; FSDP2 shards the other parameters over all data-parallel ranks. Must divide "
        "num_experts and the data-parallel degree; strategy full_shard or shard_grad_op, tp=1, cp=1.",
    )
    cpu_offload: bool = Field(
        False, description="FSDP2: keep sharded params, grads and optimizer state in host memory."
    )
    reduce_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="Gradient reduction dtype under bf16 mixed precision."
    )
    forward_prefetch: int = Field(
        1, ge=0, description="FSDP2: blocks whose all-gather is issued ahead in forward (0: off)."
    )
    backward_prefetch: int = Field(
        1, ge=0, description="FSDP2: blocks whose all-gather is issued ahead in backward (0: off)."
    )
    loss_parallel: bool = Field(
        True, description="TP: vocab-parallel fused cross-entropy on the sharded LM head (no "
        "gather of the head or the logits); false gathers the head weight."
    )
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        "none",
        description="none; full: recompute whole blocks; selective: per-op, keep matmul and "
        "attention outputs, recompute the rest.",
    )
    ac_every: int = Field(1, ge=1, description="Checkpoint every k-th block (full/selective).")
    activation_offload: bool = Field(
        False,
        description="Move each block's saved activations to pinned host memory during forward "
        "and prefetch them back in backward, on side streams (CUDA; a no-op on CPU). With full "
        "activation checkpointing only the block inputs are saved, so only they move.",
    )
    mlp_chunk_size: int | None = Field(
        None,
        gt=0,
        description="Run each block's MLP over chunks of this many sequence positions, each "
        "chunk checkpointed, so the MLP's [chunk, ffn] intermediates exist for one chunk at a "
        "time (long context; costs one more MLP forward in backward). Native families only.",
    )
    timeout_s: float = Field(
        600.0, gt=0, description="Collective timeout: a hung or dead peer fails the job after this."
    )
    nccl_debug: Literal["OFF", "WARN", "INFO", "TRACE"] | None = Field(
        None, description="NCCL_DEBUG for the job (unset: leave the environment's)."
    )
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="Process-group backend; auto: nccl on CUDA, gloo on CPU."
    )
    deepspeed_config: str | None = Field(
        None,
        description="A DeepSpeed JSON to import: ZeRO stage and offload map onto strategy and "
        "cpu_offload; batch/precision/clipping onto train.*; what is ignored is printed.",
    )

    @field_validator("dp_replicate", "dp_shard")
    @classmethod
    def _degree(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError("must be a positive degree or -1 (fill)")
        return value


class PeftConfig(Section):
    """Parameter-efficient fine-tuning and layer freezing (see docs/peft.md)."""

    method: Literal["none", "lora", "dora", "qlora", "llama_adapter"] = Field(
        "none",
        description="none: train all (unfrozen) weights; lora: low-rank adapters on a frozen base; "
        "dora: LoRA plus a learned per-row magnitude (weight-decomposed); qlora: LoRA on a base "
        "stored in 4-bit NF4 (needs torchao); llama_adapter: learnable adaption prompts with a "
        "zero-initialised gate in the top attention layers of a frozen Llama/Mistral (peft's "
        "adaption_prompt; see adapter_len, adapter_layers).",
    )
    r: int = Field(8, gt=0, description="LoRA rank: adapter matrices A [r, in] and B [out, r].")
    alpha: float = Field(
        16.0, gt=0, description="LoRA alpha: the update is scaled by alpha / r (alpha / sqrt(r) with rslora)."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter branch's input.")
    target_modules: list[str] | str = Field(
        "all-linear",
        description="Linear layers that get adapters: a list of names (ours: wq, wk, wv, wo, w1, w2, "
        "w3; or HF: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; a dotted suffix "
        "such as layers.0.attention.wq also works), 'all-linear' (every linear layer except the LM "
        "head), or one string taken as a regex that must match a whole module name (ours or HF).",
    )
    target_parameters: list[str] = Field(
        default_factory=list,
        description="Stacked MoE expert weights that get a per-expert LoRA (peft's "
        "target_parameters; Mixtral / Qwen3-MoE only, opt-in): names as in target_modules' list "
        "form, ours (w13, w2, experts.w13) or HF (gate_up_proj, down_proj, experts.gate_up_proj), "
        "or full paths. Each adds E x r x (in + out) parameters per layer. peft.method=lora or qlora "
        "(NF4 experts) with dropout 0 only (as peft); target_modules may then be [] (experts only).",
    )
    rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r) instead of alpha / r.")
    from_checkpoint: str | None = Field(
        None,
        description="Continue training a PEFT-format adapter directory (adapter_config.json + "
        "adapter_model.safetensors); its own r, alpha, targets and DoRA flag are used.",
    )
    save_merged: bool = Field(
        False,
        description="At the end of the run also write the adapters folded into the base as an HF "
        "model to OUTPUT/final-merged (OUTPUT/final always holds the PEFT-format adapter).",
    )
    base_dtype: Literal["auto", "fp32", "bf16", "fp16", "float8"] = Field(
        "auto",
        description="dtype the frozen base weights are stored in. auto: the autocast dtype under "
        "mixed precision (bf16 for qlora), else train.precision's; adapters keep the parameter dtype. "
        "float8: block linear weights in float8 e4m3 with one fixed scale per row, their matmuls "
        "run in float8 (CUDA, compute capability >= 8.9; see docs/lowmem.md).",
    )
    adapter_len: int = Field(
        10, gt=0, description="llama_adapter: adaption prompt tokens per adapted layer (llama-recipes' default)."
    )
    adapter_layers: int = Field(
        30, gt=0,
        description="llama_adapter: how many of the top transformer blocks get an adaption prompt "
        "(llama-recipes' default; at most the model's block count).",
    )
    freeze_layers: list[int] = Field(
        default_factory=list,
        description="Transformer block indices to freeze (no updates; with LoRA they get no adapters).",
    )
    num_freeze_layers: int = Field(0, ge=0, description="Freeze the first N transformer blocks.")
    freeze_embeddings: bool = Field(
        False, description="Freeze the input embedding (and the LM head when it is tied to it)."
    )

    @model_validator(mode="after")
    def _check(self) -> PeftConfig:
        if self.method == "none":
            if self.from_checkpoint is not None:
                raise ValueError("peft.from_checkpoint needs peft.method lora, dora, qlora or llama_adapter")
            if self.save_merged:
                raise ValueError("peft.save_merged needs peft.method lora, dora or qlora")
        if any(i < 0 for i in self.freeze_layers):
            raise ValueError("peft.freeze_layers holds block indices, which are >= 0")
        if self.method == "llama_adapter":
            if self.save_merged:
                raise ValueError("peft.save_merged: a llama_adapter prompt cannot be folded into "
                                 "the weights (it is extra attention input); drop save_merged")
            if self.freeze_layers or self.num_freeze_layers or self.freeze_embeddings:
                raise ValueError("peft.method=llama_adapter freezes the whole base already; drop "
                                 "freeze_layers / num_freeze_layers / freeze_embeddings (choose "
                                 "the adapted blocks with peft.adapter_layers)")
        if isinstance(self.target_modules, list) and not self.target_modules and not self.target_parameters:
            raise ValueError("peft.target_modules is empty: name at least one module or use all-linear")
        if self.target_parameters:
            self._check_expert_lora()
        return self

    def _check_expert_lora(self) -> None:
        """LoRA on MoE experts: what peft's ParamWrapper (and ours) cannot do, in one line."""
        if self.method not in ("lora", "qlora"):
            raise ValueError(f"peft.target_parameters (LoRA on MoE experts) needs peft.method=lora or "
                             f"qlora, not {self.method} (DoRA does not adapt stacked expert weights)")
        if self.dropout > 0:
            raise ValueError("peft.target_parameters (LoRA on MoE experts) needs peft.dropout=0, as "
                             "peft's ParamWrapper: input dropout cannot act on a folded weight update")
        if self.base_dtype == "float8":
            raise ValueError("peft.target_parameters (LoRA on MoE experts) with peft.base_dtype=float8 "
                             "is not supported; use base_dtype auto or bf16")


class RunConfig(Section):
    """A whole job: `tunesmith train RECIPE.yaml key=value ...` resolves to one of these."""

    task: Literal["clm", "sft", "mlm", "dpo"] = Field(
        "clm", description="clm: raw-text causal LM; sft: instruction/chat/summarization data "
        "(see sft.*); mlm: masked LM with an encoder (see mlm.*); dpo: preference tuning on "
        "prompt/chosen/rejected records (see dpo.*, rendered as sft.* says).",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    mlm: MLMConfig = Field(default_factory=MLMConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    peft: PeftConfig = Field(default_factory=PeftConfig)
    profile: ProfileConfig = Field(default_factory=ProfileConfig)

    @model_validator(mode="after")
    def _check_combinations(self) -> RunConfig:
        if self.data.path is None:
            raise ValueError("data.path is required: a text file, directory or dataset name")
        if (self.data.pad_to_multiple_of is not None and self.data.mode != "lines"
                and self.task not in ("sft", "dpo")):
            raise ValueError("data.pad_to_multiple_of only applies to data.mode=lines, task=sft and task=dpo")
        if self.schedule.warmup_steps and self.schedule.warmup_ratio:
            raise ValueError("set schedule.warmup_steps or schedule.warmup_ratio, not both")
        if self.train.max_steps is not None and self.schedule.warmup_steps > self.train.max_steps:
            raise ValueError(
                f"schedule.warmup_steps={self.schedule.warmup_steps} exceeds "
                f"train.max_steps={self.train.max_steps}"
            )
        if self.optim.name != "adamw" and self.optim.fused:
            raise ValueError("optim.fused applies to adamw only")
        _check_lowmem(self)
        if self.data.streaming and self.train.max_steps is None:
            raise ValueError("data.streaming needs train.max_steps (a stream has no length)")
        if self.eval.generate.enabled and self.task != "sft":
            raise ValueError("eval.generate needs task=sft (prompts and references)")
        if self.task == "dpo":
            _check_dpo(self)
        elif changed := self.dpo.changed():
            raise ValueError(f"{', '.join(changed)} applies to task=dpo, not task={self.task}; "
                             "set task=dpo or drop the dpo section")
        return self


def _check_dpo(cfg: RunConfig) -> None:
    """What preference tuning cannot combine with (docs/tasks.md#preference-tuning-dpo)."""
    if cfg.sft.packing:
        raise ValueError("task=dpo: sft.packing is not supported (each pair is two padded rows)")
    if cfg.data.streaming:
        raise ValueError("task=dpo: data.streaming is not supported (preference files are read whole)")
    if cfg.parallel.cp > 1:
        raise ValueError("task=dpo: context parallelism (parallel.cp > 1) is not supported yet; "
                         "use FSDP2, DDP or tensor parallelism")
    if cfg.peft.method == "llama_adapter":
        raise ValueError("task=dpo: peft.method=llama_adapter is not supported; use lora, dora or qlora")
    if cfg.train.router_aux_loss_coef is not None:
        raise ValueError("task=dpo: train.router_aux_loss_coef is not supported (the preference loss "
                         "has no router term); leave it null")


def _check_lowmem(cfg: RunConfig) -> None:
    """Combinations of the float8 / low-memory options that cannot work (docs/lowmem.md)."""
    tc, oc, pc = cfg.train, cfg.optim, cfg.peft
    if oc.bf16_stochastic_round:
        if tc.precision != "bf16-pure":
            raise ValueError("optim.bf16_stochastic_round needs train.precision=bf16-pure (bf16 weights)")
        if oc.name == "adafactor":
            raise ValueError("optim.bf16_stochastic_round applies to the adamw optimizers, not adafactor")
        if oc.fused:
            raise ValueError("optim.bf16_stochastic_round uses torchao's AdamW: drop optim.fused")
    if tc.float8 != "none":
        if tc.precision not in ("bf16", "bf16-pure"):
            raise ValueError(f"train.float8 needs train.precision bf16 or bf16-pure, not {tc.precision}")
        if pc.method != "none":
            raise ValueError("train.float8 trains linear layers in float8; for a LoRA base in float8 "
                             "use peft.base_dtype=float8 instead")
        if cfg.parallel.tp > 1:
            raise ValueError("train.float8 with tensor parallelism (parallel.tp > 1) is not supported")
        if tc.float8 != "tensorwise" and not any(fnmatchcase("output", p) for p in tc.float8_skip):
            raise ValueError(f"train.float8={tc.float8}: the LM head ('output') trains in float8 only "
                             "with tensorwise; keep 'output' in train.float8_skip")
    if tc.residual_dtype == "bf16" and tc.precision != "bf16":
        raise ValueError(f"train.residual_dtype=bf16 needs train.precision=bf16 (bf16 autocast over "
                         f"fp32 weights), not {tc.precision}")
    if tc.float8_all_gather and tc.float8 != "tensorwise":
        raise ValueError("train.float8_all_gather needs train.float8=tensorwise")
    if pc.base_dtype == "float8" and pc.method not in ("lora", "dora"):
        raise ValueError("peft.base_dtype=float8 needs peft.method lora or dora (qlora stores NF4)")
    if oc.in_backward:
        _check_in_backward(cfg)


def _check_in_backward(cfg: RunConfig) -> None:
    """optim.in_backward applies each update during backward (tunesmith/optim_backward.py)."""
    tc = cfg.train
    if tc.max_grad_norm is not None:
        raise ValueError("optim.in_backward needs train.max_grad_norm=null: the global grad norm is "
                         "known only after every parameter was already updated")
    if tc.grad_accum_steps != 1:
        raise ValueError("optim.in_backward needs train.grad_accum_steps=1 (each backward applies updates)")
    if tc.nan_policy != "halt":
        raise ValueError("optim.in_backward needs train.nan_policy=halt: an update applied during "
                         "backward cannot be skipped")
    if tc.precision == "fp16":
        raise ValueError("optim.in_backward does not work with train.precision=fp16 (its grad scaler "
                         "unscales all gradients before the step)")
