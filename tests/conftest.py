"""Shared fixtures: paths to ../shared/data, a tiny tokenizer, a tiny model recipe."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

# Tests never touch the network: fail fast instead of retrying unreachable hubs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def shared_path(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"needs ../shared/data/{'/'.join(parts)} (not present)")
    return p


@pytest.fixture(scope="module")
def gpt2_tok():
    """The real GPT-2 tokenizer from ../shared (skips when absent)."""
    from tunesmith.data import load_tokenizer

    return load_tokenizer(str(shared_path("tokenizers", "gpt2", "hf")))


@pytest.fixture(scope="module")
def llama3_tok():
    """The Llama 3 tokenizer from ../shared (skips when absent)."""
    from tunesmith.data import load_tokenizer

    return load_tokenizer(str(shared_path("tokenizers", "llama3", "hf")))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (vocab 512) trained on Python's bundled docs, as the demo does."""
    from tunesmith.cli.demo import train_tokenizer, write_corpus

    root = tmp_path_factory.mktemp("tok")
    train, _ = write_corpus(root / "data", seed=0)
    return train_tokenizer(train, root / "tokenizer", vocab_size=512)


@pytest.fixture(scope="session")
def demo_text(tiny_tokenizer_dir) -> tuple[Path, Path]:
    data = tiny_tokenizer_dir.parent / "data"
    return data / "train.txt", data / "valid.txt"


def tiny_overrides(tok_dir: Path, out_dir: Path, train_file: Path, **extra) -> list[str]:
    """Overrides for a ~100K-param Llama trained for a few steps on CPU."""
    ov = [
        "model.name=tiny", f"model.tokenizer={tok_dir}",
        "model.overrides={vocab_size: 512, dim: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2, "
        "intermediate_size: 128, max_position_embeddings: 512}",
        f"data.path={train_file}", "data.block_size=64", "train.micro_batch_size=8",
        "train.precision=fp32", "logging.progress=false", f"output.dir={out_dir}",
        "optim.lr=3e-3", "schedule.warmup_steps=5",
    ]
    ov += [f"{k}={v}" for k, v in extra.items()]
    return ov
