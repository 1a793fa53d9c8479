"""The guides' command lines, read from ../shared/seeds, and a local stand-in for the hub.

`guide_commands` pulls every command of a script (run_clm.py, ...) out of a guide's code
blocks, exactly as written (line continuations joined, shell variables given their
documented defaults). `World` builds the tiny local models, tokenizers and data mirror that
replace the hub ids, and `localize` swaps them in; nothing else of a command is changed.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, shared_path

SEEDS = REPO.parent / "shared" / "seeds"
GUIDE_HABANA = "004_94b390e02f0d7a3c.txt"  # optimum-habana language modelling
GUIDE_XLA = "001_4bcedd41566f48a3.txt"  # PyTorch/XLA SPMD run_clm
GUIDE_LLAMA_RECIPES = "002_b5850c461f39b4d1.txt"  # llama-recipes

# The Dockerfile of the XLA guide sets these with ARG defaults.
_SHELL_VARS = {"GLOBAL_BATCH_SIZE": "256", "SPMD_SHARDING_FLAG": "--spmd_2d_sharding 2"}


def guide_text(name: str) -> str:
    path = SEEDS / name
    if not path.is_file():
        pytest.skip(f"needs ../shared/seeds/{name} (not present)")
    return path.read_text(encoding="utf-8")


def guide_commands(name: str, script: str) -> list[list[str]]:
    """The argument lists following `script` (e.g. run_clm.py) in the guide's code blocks."""
    text = guide_text(name)
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S)
    if name.endswith(".txt") and not blocks:  # reStructuredText guides have none
        blocks = [text]
    commands = []
    for block in blocks:
        joined = re.sub(r"\\\n", " ", block)
        for line in joined.splitlines():
            words = line.split()
            hits = [i for i, w in enumerate(words) if Path(w).name == script or w == script]
            if not hits:
                continue
            rest = " ".join(words[hits[0] + 1:])
            rest = re.sub(r"\$\{(\w+)\}", lambda m: _SHELL_VARS[m.group(1)], rest)
            commands.append(shlex.split(rest.rstrip("'")))
    return commands


@dataclass
class World:
    """Local stand-ins for the hub ids of the guides (tiny random weights, real tokenizers)."""

    root: Path
    gpt2: Path
    gptj: Path
    neox: Path
    roberta: Path
    llama_qlora: Path
    llama_config: Path
    mirror: Path
    deepspeed: Path

    def models(self) -> dict[str, str]:
        stories = str(shared_path("models", "stories260K", "hf"))
        return {
            "gpt2": str(self.gpt2), "gpt2-xl": str(self.gpt2), "EleutherAI/gpt-j-6b": str(self.gptj),
            "EleutherAI/gpt-neox-20b": str(self.neox), "roberta-base": str(self.roberta),
            "huggyllama/llama-7b": stories, "/path_of_model_folder/8B": str(self.llama_qlora),
            "hf-internal-testing/llama-tokenizer": str(shared_path("tokenizers", "llama2", "hf")),
            "~/config.json": str(self.llama_config), "/config.json": str(self.llama_config),
        }


_MODEL_FLAGS = ("--model_name_or_path", "--tokenizer_name", "--config_name", "--model_name")


def localize(argv: list[str], world: World) -> list[str]:
    """Replace hub ids and placeholder paths by local ones; everything else stays as written."""
    models = world.models()
    files = {"path_to_train_file": str(shared_path("text", "wikitext-2", "wiki.test.raw")),
             "path_to_validation_file": str(shared_path("text", "wikitext-2", "wiki.valid.raw")),
             "path_for_deepspeed_config": str(world.deepspeed),
             "path_to_my_deepspeed_config": str(world.deepspeed)}
    out = list(argv)
    for i, word in enumerate(out[:-1]):
        nxt = out[i + 1]
        if word in _MODEL_FLAGS and nxt in models:
            out[i + 1] = models[nxt]
        elif nxt in files:
            out[i + 1] = files[nxt]
    return out


def _save_tunesmith(preset: str, overrides: dict, tokenizer_dir: Path, out: Path) -> Path:
    from tunesmith.data import load_tokenizer
    from tunesmith.models import build_model, init_random, resolve_model_config, save_pretrained

    family, cfg = resolve_model_config(preset, overrides)
    model = init_random(build_model(family, cfg), "cpu", "float32", seed=0)
    return save_pretrained(model, family, cfg, out, tokenizer=load_tokenizer(str(tokenizer_dir)))


def _save_gptj(tokenizer_dir: Path, out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, GPTJConfig, GPTJForCausalLM

    torch.manual_seed(0)
    cfg = GPTJConfig(vocab_size=50257, n_positions=1024, n_embd=64, n_layer=2, n_head=4,
                     rotary_dim=8, tie_word_embeddings=False)
    GPTJForCausalLM(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def _mirror(root: Path) -> Path:
    """TUNESMITH_DATASETS layout. WikiText-2's train split is not in ../shared/data: its test
    split stands in for it (as in recipes/gpt2_clm_wikitext.yaml)."""
    wiki = root / "text" / "wikitext-2"
    wiki.mkdir(parents=True)
    (wiki / "wiki.train.raw").symlink_to(shared_path("text", "wikitext-2", "wiki.test.raw"))
    (wiki / "wiki.valid.raw").symlink_to(shared_path("text", "wikitext-2", "wiki.valid.raw"))
    alpaca = root / "instruct" / "alpaca"
    alpaca.mkdir(parents=True)
    records = json.loads(shared_path("instruct", "alpaca", "alpaca_data_first335.json").read_text())
    (alpaca / "alpaca_data.json").write_text(json.dumps(records[:48]))
    # SAMSum is not in ../shared/data: a few records in its schema (id, dialogue, summary).
    samsum = root / "instruct" / "samsum"
    samsum.mkdir(parents=True)
    rows = [{"id": str(i), "dialogue": f"Ann: Lunch at {i}?\r\nBob: Sure, see you.",
             "summary": f"Ann and Bob have lunch at {i}."} for i in range(40)]
    (samsum / "train.json").write_text(json.dumps(rows[:32]))
    (samsum / "validation.json").write_text(json.dumps(rows[32:]))
    return root


def build_world(root: Path) -> World:
    from tunesmith.data.roberta_tokenizer import build as build_roberta_tokenizer

    gpt2_tok = shared_path("tokenizers", "gpt2", "hf")
    stories = shared_path("models", "stories260K", "hf")
    small = {"n_embd": 64, "n_head": 4, "n_layer": 2}
    rtok = build_roberta_tokenizer(gpt2_tok, root / "roberta-tok")
    llama_config = root / "llama_2_tiny.json"
    llama_config.write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000,
        "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2}))
    # The guide's ZeRO-2 config, as printed in it.
    deepspeed = root / "deepspeed_zero_2.json"
    deepspeed.write_text(json.dumps({
        "steps_per_print": 64, "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "bf16": {"enabled": True}, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2, "overlap_comm": False, "reduce_scatter": False,
                              "contiguous_gradients": False}}))
    return World(
        root=root,
        gpt2=_save_tunesmith("gpt2", small, gpt2_tok, root / "gpt2"),
        gptj=_save_gptj(gpt2_tok, root / "gpt-j"),
        neox=_save_tunesmith("pythia-tiny", {"vocab_size": 50304, "max_position_embeddings": 2048},
                             gpt2_tok, root / "gpt-neox"),
        roberta=_save_tunesmith("roberta-tiny", {"vocab_size": 50262}, rtok, root / "roberta"),
        # QLoRA's NF4 blocks need widths that are multiples of 128.
        llama_qlora=_save_tunesmith("tiny", {"vocab_size": 512, "dim": 128, "n_layers": 2,
                                             "n_heads": 4, "n_kv_heads": 4,
                                             "intermediate_size": 256},
                                    stories, root / "llama-8b-stand-in"),
        llama_config=llama_config, mirror=_mirror(root / "mirror"), deepspeed=deepspeed,
    )
