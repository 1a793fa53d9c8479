"""Configuration of the MoE family (Mixtral, Qwen3-MoE) and its HF `config.json` mapping.

A Llama-family config (attention, RoPE, norms: `LlamaConfig`) plus the sparse MLP:
    mixtral:   every layer is sparse; experts are SwiGLU of width `intermediate_size`; the
               top-k routing weights are always renormalised to sum to 1; no attention bias;
               `sliding_window` is accepted and ignored as for Mistral (full causal attention)
    qwen3_moe: Qwen3 attention (per-head q/k RMSNorm, `attention_bias` on q, k, v and o);
               experts of width `moe_intermediate_size`; renormalised iff `norm_topk_prob`;
               layer i is dense (a SwiGLU of width `intermediate_size`) when i is in
               `mlp_only_layers` or (i + 1) is not a multiple of `decoder_sparse_step`
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from tunesmith.errors import TunesmithError
from tunesmith.models.common import preset_from_table
from tunesmith.models.llama.config import HF_KEY_MAP as LLAMA_KEYS
from tunesmith.models.llama.config import LlamaConfig, _read_rope
from tunesmith.models.llama.config import apply_overrides as llama_overrides

MODEL_TYPES = ("mixtral", "qwen3_moe")
_ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}

HF_KEY_MAP: dict[str, str] = {
    **LLAMA_KEYS,
    "num_local_experts": "num_experts",  # Mixtral's name (and what transformers 5 writes)
    "num_experts": "num_experts",  # Qwen3-MoE's name
    "num_experts_per_tok": "num_experts_per_tok",
    "moe_intermediate_size": "moe_intermediate_size",
    "norm_topk_prob": "norm_topk_prob",
    "router_aux_loss_coef": "router_aux_loss_coef",
    "decoder_sparse_step": "decoder_sparse_step",
    "mlp_only_layers": "mlp_only_layers",
}


@dataclass
class MoEConfig(LlamaConfig):
    """`LlamaConfig` plus the experts. `moe_intermediate_size` 0 means `intermediate_size`
    (Mixtral's experts have the dense width). `router_aux_loss_coef` is the checkpoint's
    recorded coefficient, written back on save; training adds the load-balancing loss only
    when `train.router_aux_loss_coef` is set (as HF adds it only with output_router_logits)."""

    model_type: str = "mixtral"
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    MODEL_TYPES: ClassVar[tuple[str, ...]] = MODEL_TYPES

    def __post_init__(self) -> None:
        if not self.moe_intermediate_size:
            self.moe_intermediate_size = self.intermediate_size
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        where = f"model config ({self.model_type})"
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                     "decoder_sparse_step"):
            if int(getattr(self, name)) <= 0:
                raise TunesmithError(f"{where}: {name} must be positive, got {getattr(self, name)}")
        if self.num_experts_per_tok > self.num_experts:
            raise TunesmithError(f"{where}: num_experts_per_tok ({self.num_experts_per_tok}) "
                                 f"exceeds num_experts ({self.num_experts})")
        bad = [i for i in self.mlp_only_layers if not 0 <= int(i) < self.n_layers]
        if bad:
            raise TunesmithError(f"{where}: mlp_only_layers {bad} are not layers of a "
                                 f"{self.n_layers}-layer model")
        bias = (self.attention_bias, self.attention_out_bias, self.mlp_bias)
        if (self.rope_scaling is not None or self.mlp_bias
                or (self.model_type == "mixtral" and any(bias))
                or self.attention_out_bias != self.attention_bias):
            raise TunesmithError(f"{where}: HF {self.model_type} cannot express rope_scaling="
                                 f"{self.rope_scaling}, attention_bias={bias[0]}, "
                                 f"attention_out_bias={bias[1]}, mlp_bias={bias[2]}")
        if self.model_type == "mixtral" and (self.mlp_only_layers or self.decoder_sparse_step != 1
                                             or not self.norm_topk_prob):
            raise TunesmithError(f"{where}: HF mixtral has sparse layers only and always "
                                 "renormalises the top-k weights (mlp_only_layers=[], "
                                 "decoder_sparse_step=1, norm_topk_prob=true)")

    def is_sparse(self, layer_id: int) -> bool:
        """Layer `layer_id` has experts (HF Qwen3-MoE's rule; every layer for Mixtral)."""
        return (layer_id not in self.mlp_only_layers
                and (layer_id + 1) % self.decoder_sparse_step == 0)

    @property
    def sparse_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_sparse(i)]

    # ------------------------------------------------------------------ HF conversion
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> MoEConfig:
        """Build from a HF Mixtral / Qwen3-MoE `config.json` (transformers 4.x or 5.x)."""
        model_type = hf.get("model_type")
        if model_type not in MODEL_TYPES:
            raise TunesmithError(f"config.json: model_type {model_type!r} is not an MoE model; "
                                 f"known: {', '.join(MODEL_TYPES)}")
        if hf.get("hidden_act", "silu") != "silu":
            raise TunesmithError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported "
                                 "(only 'silu')")
        if float(hf.get("router_jitter_noise") or 0.0) != 0.0:
            raise TunesmithError("config.json: router_jitter_noise > 0 is not supported "
                                 "(tunesmith routes without noise)")
        if model_type == "qwen3_moe" and hf.get("use_sliding_window"):
            raise TunesmithError("config.json: qwen3_moe with use_sliding_window=true is not "
                                 "supported (tunesmith runs full causal attention in every layer)")
        kw: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        skip = ("rope_parameters", "rope_theta", "rope_scaling", "architectures")
        for key, value in hf.items():
            ours = HF_KEY_MAP.get(key)
            if ours is not None and key not in skip:
                kw[ours] = value
            elif key not in skip:
                extra[key] = value
        kw["rope_theta"], kw["rope_scaling"] = _read_rope(hf)
        kw["torch_dtype"] = str(kw.get("torch_dtype") or "float32").replace("torch.", "")
        kw["head_dim"] = kw.get("head_dim") or 0
        kw["n_kv_heads"] = kw.get("n_kv_heads") or 0
        kw["mlp_only_layers"] = list(kw.get("mlp_only_layers") or [])
        if model_type == "mixtral":
            kw["attention_bias"] = kw["attention_out_bias"] = False
            kw["norm_topk_prob"] = True
        else:
            kw["attention_out_bias"] = bool(kw.get("attention_bias", False))
            kw.setdefault("norm_topk_prob", False)  # HF Qwen3MoeConfig's default
        kw.setdefault("bos_token_id", None)
        kw.setdefault("eos_token_id", None)
        return cls(**kw, extra=extra)

    def to_hf(self) -> dict[str, Any]:
        """HF `config.json` dict as transformers 5 writes it for this model type."""
        self.validate()
        out = self.hf_decoder_fields(_ARCHITECTURES[self.model_type],
                                     {"rope_theta": float(self.rope_theta), "rope_type": "default"})
        out.update(num_experts_per_tok=self.num_experts_per_tok, output_router_logits=False,
                   router_aux_loss_coef=self.router_aux_loss_coef)
        if self.model_type == "mixtral":
            out.update(num_local_experts=self.num_experts, sliding_window=None,
                       router_jitter_noise=0.0)
        else:
            out.update(num_experts=self.num_experts, moe_intermediate_size=self.moe_intermediate_size,
                       norm_topk_prob=self.norm_topk_prob, decoder_sparse_step=self.decoder_sparse_step,
                       mlp_only_layers=list(self.mlp_only_layers), attention_bias=self.attention_bias,
                       use_sliding_window=False, sliding_window=None,
                       max_window_layers=self.n_layers)
        return out

    @property
    def block_matmul_params(self) -> int:
        """Matmul weights one token goes through in all blocks (the N of MFU counts the work
        done, not the weights stored): attention, and per sparse layer the router (D x E) and
        the top-k experts (3 x D x I each); a dense layer's SwiGLU (3 x D x intermediate)."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        sparse = (self.dim * self.num_experts
                  + self.num_experts_per_tok * 3 * self.dim * self.moe_intermediate_size)
        n_sparse = len(self.sparse_layers)
        return (self.n_layers * attn + n_sparse * sparse
                + (self.n_layers - n_sparse) * 3 * self.dim * self.intermediate_size)


def apply_overrides(cfg: MoEConfig, overrides: dict[str, Any] | None) -> MoEConfig:
    """A copy of `cfg` with overrides (our names, HF's or GPT-2's); `moe_intermediate_size`
    follows `intermediate_size` for Mixtral, whose experts have the dense width, and Qwen3-MoE's
    `attention_bias` covers the o projection too, as in HF."""
    if overrides and cfg.model_type == "mixtral" and "intermediate_size" in overrides:
        overrides = {**overrides, "moe_intermediate_size": overrides["intermediate_size"]}
    if overrides and cfg.model_type == "qwen3_moe" and "attention_bias" in overrides:
        overrides = {**overrides, "attention_out_bias": overrides["attention_bias"]}
    return llama_overrides(cfg, overrides, HF_KEY_MAP)  # type: ignore[return-value]


def _preset_table() -> dict[str, dict[str, Any]]:
    # Values from the published config.json of mistralai/Mixtral-8x7B-v0.1 and
    # Qwen/Qwen3-30B-A3B (eos as in the Qwen3 instruct configs, like the qwen3 presets).
    return {
        # Test/demo model: Qwen3-MoE style (q/k norm, 8 experts, top-2, one dense layer).
        "moe-tiny": dict(model_type="qwen3_moe", vocab_size=512, dim=64, n_layers=2, n_heads=4,
                         n_kv_heads=2, head_dim=16, intermediate_size=128,
                         moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                         norm_topk_prob=True, rope_theta=10000.0, max_position_embeddings=2048,
                         norm_eps=1e-6, bos_token_id=1, eos_token_id=2),
        "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, dim=4096, n_layers=32,
                             n_heads=32, n_kv_heads=8, intermediate_size=14336, num_experts=8,
                             num_experts_per_tok=2, rope_theta=1000000.0, norm_eps=1e-5,
                             max_position_embeddings=32768, router_aux_loss_coef=0.02,
                             bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16"),
        "qwen3-30b-a3b": dict(model_type="qwen3_moe", vocab_size=151936, dim=2048, n_layers=48,
                              n_heads=32, n_kv_heads=4, head_dim=128, intermediate_size=6144,
                              moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                              norm_topk_prob=True, rope_theta=1000000.0, norm_eps=1e-6,
                              max_position_embeddings=40960, router_aux_loss_coef=0.001,
                              bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16"),
    }


PRESET_NAMES: tuple[str, ...] = tuple(_preset_table())


def preset(name: str) -> MoEConfig:
    """A named preset config (fresh object each call)."""
    return preset_from_table(MoEConfig, _preset_table(), name, "model")
