"""Tiny image+text Gemma 3 checkpoints (HF `gemma3`, Gemma3ForConditionalGeneration) written by
transformers itself, for the tests of training their text tower."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

SLIDE, FULL = "sliding_attention", "full_attention"
# The text tower as gemma-3-4b's, shrunk: window 8 (sequences go past it), linear RoPE scaling 8
# on the full layers, every other layer full. The image tokens sit above the 512 text tokens
# the tests' tokenizer has, as in the real vocabulary (262144 text + 64).
TEXT = dict(vocab_size=520, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
            query_pre_attn_scalar=24, max_position_embeddings=512, sliding_window_pattern=2,
            rope_scaling={"rope_type": "linear", "factor": 8.0})
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
              image_size=28, patch_size=14)
IMAGE_TOKENS = dict(boi_token_index=516, eoi_token_index=517, image_token_index=519,
                    mm_tokens_per_image=4)


def save_tiny_gemma3(out: Path, seed: int = 0) -> transformers.Gemma3ForConditionalGeneration:
    """Write a random fp32 Gemma3ForConditionalGeneration (save_pretrained) to `out`; returns it.
    Language-model weights get O(1) activations (norm weights around 0: Gemma scales by 1 + w)."""
    cfg = transformers.Gemma3Config(text_config=TEXT, vision_config=VISION, **IMAGE_TOKENS)
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.model.language_model.named_parameters():
            p.normal_(0.0, 0.3 if "norm" in name else 0.15)
    model.save_pretrained(out)
    return model


def rename_weights(src: Path, dst: Path, old: str, new: str) -> None:
    """Copy checkpoint dir `src` to `dst` with tensor-name prefix `old` replaced by `new`."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name == "model.safetensors":
            tensors = load_file(f)
            save_file({(new + k[len(old):] if k.startswith(old) else k): v
                       for k, v in tensors.items()}, dst / f.name, metadata={"format": "pt"})
        elif f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())


def as_image_text(text_dir: Path, out: Path) -> Path:
    """The Gemma 3 text checkpoint `text_dir` dressed as an image+text one (as transformers'
    save_pretrained writes it): its config under `text_config`, its tensors under
    `language_model.`, and a (random) vision tower and projector beside them."""
    import json

    out.mkdir(parents=True)
    text_cfg = json.loads((text_dir / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": text_cfg, "vision_config": {"model_type": "siglip_vision_model", **VISION},
        "tie_word_embeddings": text_cfg.get("tie_word_embeddings", True), **IMAGE_TOKENS}))
    tensors = {"language_model." + k: v for k, v in load_file(text_dir / "model.safetensors").items()}
    gen = torch.Generator().manual_seed(0)
    tensors["vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.randn(16, 3, 14, 14, generator=gen)
    tensors["multi_modal_projector.mm_input_projection_weight"] = torch.randn(16, text_cfg["hidden_size"], generator=gen)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out
