"""`tunesmith demo`: pre-train a small Llama from scratch with nothing downloaded.

The corpus is the English reference documentation that ships inside every CPython
(`pydoc_data.topics`, ~465 KB). A byte-level BPE tokenizer is trained on it with the `tokenizers`
library, then the ordinary `tunesmith train` path runs on it, so the demo exercises exactly
what users run.
"""

from __future__ import annotations

import json
import random
import shlex
import sys
import textwrap
from pathlib import Path

from tunesmith.errors import TunesmithError

DEMO_VOCAB = 2048
SAMPLE_PROMPT, SAMPLE_TOKENS = "The list", 40
# What a demo run leaves in its --output directory; any of them marks an earlier demo.
DEMO_PARTS = ("data", "tokenizer", "run")

DEMO_RECIPE = {
    "model": {
        "name": "tiny",
        "overrides": {
            "vocab_size": DEMO_VOCAB, "dim": 128, "n_layers": 6, "n_heads": 4, "n_kv_heads": 2,
            "intermediate_size": 384, "max_position_embeddings": 512, "tie_word_embeddings": True,
            # the ids train_tokenizer gives <|endoftext|> (0) and <|pad|> (1), not the
            # preset's bos 1 / eos 2: a new user's first run then has no note about fixing them
            "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1,
        },
    },
    "data": {"block_size": 128, "mode": "packed"},
    "optim": {"lr": 3e-3, "weight_decay": 0.1, "betas": [0.9, 0.95]},
    "schedule": {"name": "cosine", "warmup_steps": 20, "min_lr_ratio": 0.1},
    "train": {"micro_batch_size": 16, "max_steps": 450, "precision": "bf16", "seed": 1234},
    "eval": {"at_start": True, "every_steps": 150, "max_batches": 40},
    "logging": {"steps": 20},
}


def demo_corpus() -> list[str]:
    """Paragraphs of Python's shipped documentation, in a fixed order."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distro builds strip pydoc_data
        raise TunesmithError("this Python has no pydoc_data module, the demo's corpus") from None
    paragraphs = []
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            para = " ".join(line.strip() for line in para.splitlines() if line.strip())
            if len(para) > 40:
                paragraphs.append(para)
    return paragraphs


def write_corpus(data_dir: Path, seed: int) -> tuple[Path, Path]:
    paragraphs = demo_corpus()
    random.Random(seed).shuffle(paragraphs)
    n_val = max(1, len(paragraphs) // 20)
    data_dir.mkdir(parents=True, exist_ok=True)
    train, valid = data_dir / "train.txt", data_dir / "valid.txt"
    train.write_text("\n".join(paragraphs[n_val:]) + "\n", encoding="utf-8")
    valid.write_text("\n".join(paragraphs[:n_val]) + "\n", encoding="utf-8")
    return train, valid


def train_tokenizer(train_file: Path, out_dir: Path, vocab_size: int = DEMO_VOCAB) -> Path:
    """Byte-level BPE (GPT-2 style) trained on the corpus, saved as an HF tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train([str(train_file)], trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<|pad|>", model_max_length=DEMO_RECIPE["model"]["overrides"]["max_position_embeddings"],
    )
    hf.save_pretrained(out_dir)
    return out_dir


def check_earlier_demo(out: Path, overwrite: bool) -> None:
    """Refuse to replace an earlier demo's output unless asked to (--overwrite)."""
    found = [p for p in DEMO_PARTS if (out / p).exists()]
    if found and not overwrite:
        raise TunesmithError(
            f"{out} holds an earlier demo ({', '.join(found)}); add --overwrite to replace it, "
            "or choose another --output")


def run_demo(output: str, steps: int | None = None, overwrite: bool = False) -> dict:
    import torch

    from tunesmith.config import RunConfig
    from tunesmith.eval.run import run_generate
    from tunesmith.train.setup import check_output_dir, run_training

    out = Path(output)
    check_output_dir(out, overwrite)
    check_earlier_demo(out, overwrite)
    seed = DEMO_RECIPE["train"]["seed"]
    print(f"tunesmith demo: corpus = Python's bundled documentation -> {out}/data", file=sys.stderr)
    train_file, valid_file = write_corpus(out / "data", seed)
    tok_dir = train_tokenizer(train_file, out / "tokenizer")
    recipe = json.loads(json.dumps(DEMO_RECIPE))  # deep copy
    recipe["model"]["tokenizer"] = str(tok_dir)
    recipe["data"].update(path=str(train_file), validation_path=str(valid_file))
    recipe["output"] = {"dir": str(out / "run"), "overwrite": overwrite}
    if not torch.cuda.is_available():
        # bf16 autocast only pays off on GPUs; ask for fp32 so the CPU run has nothing to explain.
        recipe["train"]["precision"] = "fp32"
    if steps is not None:
        recipe["train"]["max_steps"] = steps
        recipe["schedule"]["warmup_steps"] = min(recipe["schedule"]["warmup_steps"], steps)
    cfg = RunConfig.model_validate(recipe)
    summary = run_training(cfg)
    if summary.get("interrupted"):
        return summary  # run_training already said where the checkpoint is and how to resume
    final = summary["final_model"]
    sample = run_generate(final, SAMPLE_PROMPT, max_new_tokens=SAMPLE_TOKENS)
    print(
        f"\neval perplexity: {summary['perplexity_start']:.1f} before training -> "
        f"{summary['perplexity']:.1f} after {summary['steps']} steps "
        f"({summary['runtime_s']:.0f} s on {summary['device']})",
    )
    print(f"sample (greedy, {SAMPLE_TOKENS} new tokens after {SAMPLE_PROMPT!r}):")
    print(textwrap.indent(sample.strip(), "    "))
    print(f"model: {final}  (try: tunesmith generate {final} --prompt {shlex.quote(SAMPLE_PROMPT)})")
    return summary
