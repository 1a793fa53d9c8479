"""Generic fallback family: any transformers `AutoModelForCausalLM` without a native port.

Slower than the native families (HF's module code, HF loading instead of our streaming loader,
no FLOP model beyond 6 N), but it exposes what the trainer needs:

    forward(input_ids, positions=, attn=, return_hidden=True) -> final normed hidden [B, T, D]
    output                                                    -> the LM head (nn.Linear)
    layers                                                    -> the decoder blocks (compile)

Attention specs map to HF inputs: padding -> 2-D attention_mask; documents (packed SFT) -> a
4-D boolean mask [B, 1, T, T] plus per-document position_ids, which transformers' SDPA path
uses as given. Models that rescale or soft-cap logits after the head (Gemma 2, Cohere, ...) are
refused: the fused loss computes logits as hidden @ head.T.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.models.adapter_base import StateDictAdapter
from tunesmith.models.attention import AttnSpec, _causal_mask, document_positions
from tunesmith.models.family import ModelFamily

# Config attributes that change logits after the LM head; the fused loss cannot honour them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                     "output_multiplier_scale")


def known_model_type(model_type: str) -> bool:
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


@dataclass
class GenericConfig:
    """A HF config.json dict plus the few attributes the rest of tunesmith reads."""

    hf: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def model_type(self) -> str:
        return str(self.hf.get("model_type", ""))

    def _get(self, *names: str, default: Any = None) -> Any:
        for n in names:
            if self.hf.get(n) is not None:
                return self.hf[n]
        return default

    @property
    def vocab_size(self) -> int:
        return int(self._get("vocab_size", default=0))

    @property
    def max_position_embeddings(self) -> int:
        return int(self._get("max_position_embeddings", "n_positions", default=2048))

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(self._get("tie_word_embeddings", default=True))

    @property
    def bos_token_id(self) -> Any:
        return self.hf.get("bos_token_id")

    @property
    def eos_token_id(self) -> Any:
        return self.hf.get("eos_token_id")

    @property
    def pad_token_id(self) -> Any:
        return self.hf.get("pad_token_id")

    def validate(self) -> None:
        if not known_model_type(self.model_type):
            raise TunesmithError(f"model_type {self.model_type!r} is unknown to transformers")
        bad = [n for n in _LOGIT_TRANSFORMS if self.hf.get(n) not in (None, 1, 1.0)]
        if bad:
            raise TunesmithError(
                f"model_type {self.model_type!r} transforms its logits ({', '.join(bad)}); the "
                "generic fallback cannot train it with the fused loss")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> GenericConfig:
        return cls(dict(hf))

    def to_hf(self) -> dict[str, Any]:
        return dict(self.hf)

    def hf_config(self) -> Any:
        from transformers import AutoConfig

        kw = {k: v for k, v in self.hf.items() if k not in ("model_type", "transformers_version")}
        return AutoConfig.for_model(self.model_type, **kw)


def apply_overrides(cfg: GenericConfig, overrides: dict[str, Any] | None) -> GenericConfig:
    """Overrides use the model's own HF config names (no aliases: they differ per family)."""
    return GenericConfig({**cfg.hf, **(overrides or {})})


class GenericAdapter(StateDictAdapter):
    """Names are HF's own, under the wrapper's `hf.` prefix (used only by checkpoints)."""

    def native_key_to_hf(self, key: str) -> str | None:
        return key.removeprefix("hf.")

    def hf_key_to_native(self, key: str) -> str | None:
        return "hf." + key


class HFCausalLM(nn.Module):
    """Wraps a transformers causal LM behind the native forward signature."""

    def __init__(self, cfg: GenericConfig) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.cfg = cfg
        hf_cfg = cfg.hf_config()
        hf_cfg._attn_implementation = "sdpa"  # 4-D document masks need the SDPA/eager path
        self.hf = AutoModelForCausalLM.from_config(hf_cfg)

    @property
    def base(self) -> nn.Module:
        return getattr(self.hf, self.hf.base_model_prefix)

    @property
    def output(self) -> nn.Module:
        return self.hf.get_output_embeddings()

    @property
    def tok_embeddings(self) -> nn.Module:
        return self.hf.get_input_embeddings()

    @property
    def layers(self) -> nn.ModuleList:
        for name in ("layers", "h", "blocks"):
            mods = getattr(self.base, name, None)
            if isinstance(mods, nn.ModuleList):
                return mods
        return nn.ModuleList()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """HF's own init (seeded through the global RNG: HF init takes no generator)."""
        if generator is not None:
            torch.manual_seed(int(generator.initial_seed()))
        self.hf.apply(self.hf._init_weights)
        self.hf.tie_weights()

    def _hf_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor | None,
                   attn: AttnSpec | None) -> dict[str, Any]:
        kw: dict[str, Any] = {"input_ids": input_ids, "use_cache": False}
        if attn is not None and attn.kind == "padding":
            kw["attention_mask"] = attn.attention_mask
        elif attn is not None and attn.kind == "documents":
            doc = attn.doc_ids.to(input_ids.device)  # type: ignore[union-attr]  # [B, T]
            t = doc.shape[1]
            same = (doc[:, :, None] == doc[:, None, :]) & _causal_mask(t, t, doc.device)[None]
            kw["attention_mask"] = same[:, None]  # [B, 1, T, T] bool, used as given
            if positions is None:
                positions = document_positions(doc)
        if positions is not None:
            kw["position_ids"] = positions
        return kw

    def forward(self, input_ids: torch.Tensor, *, positions: torch.Tensor | None = None,
                attn: AttnSpec | None = None, cache: Any = None,
                return_hidden: bool = False) -> torch.Tensor:
        if cache is not None:
            raise TunesmithError("the generic HF fallback decodes with HF generate, not a "
                                 "tunesmith KV cache")
        hidden = self.base(**self._hf_inputs(input_ids, positions, attn)).last_hidden_state
        return hidden if return_hidden else self.output(hidden)

    @torch.no_grad()
    def generate_tokens(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float,
                        eos_token_id: Any, generator: torch.Generator | None,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Prompt + new tokens [B, T + n] via HF generate (greedy when temperature is 0);
        attention_mask [B, T] marks left padding (None: none)."""
        if generator is not None:
            torch.manual_seed(int(generator.initial_seed()))
        sample = temperature > 0
        return self.hf.generate(
            input_ids, max_new_tokens=max_new_tokens,
            attention_mask=torch.ones_like(input_ids) if attention_mask is None else attention_mask.long(),
            do_sample=sample, temperature=temperature if sample else None, top_k=None,
            top_p=None, eos_token_id=eos_token_id, pad_token_id=(
                eos_token_id[0] if isinstance(eos_token_id, list) else eos_token_id) or 0)

    def num_params(self, exclude_embedding: bool = False) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> int:
        """6 N: no attention term, since the architecture is not known here."""
        return 6 * self.num_params()


def load_generic(model: HFCausalLM, source: str | Path, device: torch.device | str,
                 dtype: torch.dtype) -> HFCausalLM:
    """HF from_pretrained (HF's loader, not tunesmith's streaming one), copied into `model`.

    `model` may still be on meta and may carry transforms (frozen dtypes, LoRA layers): its
    own tensors are allocated on `device` and filled by name, so the transforms stay; tensors
    HF does not hold (adapters) are left for the caller. Host memory holds the HF copy once.
    """
    from transformers import AutoModelForCausalLM

    try:
        hf = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype,
                                                  attn_implementation="sdpa")
    except Exception as exc:  # noqa: BLE001 - any loader failure is the checkpoint's
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TunesmithError(f"cannot load {source} with transformers: {msg}") from None
    model.to_empty(device=device)
    ours = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        for name, t in [*hf.named_parameters(), *hf.named_buffers()]:
            target = ours.get("hf." + name)
            if target is not None:
                target.copy_(t)
    model.hf.tie_weights()
    return model


def save_generic(model: HFCausalLM, out_dir: Path) -> None:
    model.hf.save_pretrained(str(out_dir))


# The fallback family: any model_type transformers knows and no folder here serves.
FAMILY = ModelFamily(
    name="hf",
    model_types=(),
    config_cls=GenericConfig,
    model_cls=HFCausalLM,
    adapter_cls=GenericAdapter,
    presets={},
    apply_overrides=apply_overrides,
    shardable=False,
    load_fn=load_generic,
    save_fn=save_generic,
)
