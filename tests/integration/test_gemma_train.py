"""A tiny Gemma 3 through the real CLI: the fused-loss training loop learns, the saved model is
an ordinary Gemma3ForCausalLM with the same logits, and a run stopped and resumed is bitwise
the uninterrupted one. Sequences (64) are longer than the sliding window (16) of the
`gemma3-tiny` preset (4 layers, sliding and full alternating)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from tunesmith.cli.main import run


def _overrides(tok: Path, train: Path, out: Path, model: str = "gemma3-tiny",
               **extra: object) -> list[str]:
    ov = [f"model.name={model}", f"model.tokenizer={tok}", f"data.path={train}",
          "data.block_size=64", "data.max_train_samples=200", "train.micro_batch_size=8",
          "train.precision=fp32", "logging.progress=false", "logging.steps=1", "eval.at_end=false",
          f"output.dir={out}", "optim.lr=3e-3", "schedule.name=constant", "schedule.warmup_steps=2"]
    return ov + [f"{k}={v}" for k, v in extra.items()]


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_gemma_trains_saves_and_resumes_exactly(tmp_path: Path, tiny_tokenizer_dir: Path,
                                                demo_text: tuple[Path, Path]) -> None:
    train = demo_text[0]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(["-q", "train", *_overrides(tiny_tokenizer_dir, train, straight,
                                           **{"train.max_steps": 10})]) == 0
    losses = _losses(straight)
    assert len(losses) == 10 and losses[10] < losses[1] - 0.4, losses  # measured: 6.25 -> 5.50

    # Stopped at 5 with a checkpoint, resumed to 10: the same losses and weights, bit for bit.
    ckpt = {"checkpoint.every_steps": 5}
    assert run(["-q", "train", *_overrides(tiny_tokenizer_dir, train, split,
                                           **{"train.max_steps": 5, **ckpt})]) == 0
    assert run(["-q", "train", *_overrides(tiny_tokenizer_dir, train, split,
                                           **{"train.max_steps": 10, **ckpt,
                                              "checkpoint.resume": "auto"})]) == 0
    assert _losses(split) == losses
    a, b = (load_file(d / "final" / "model.safetensors") for d in (split, straight))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # The final model is a Gemma3ForCausalLM with our logits.
    from transformers import AutoModelForCausalLM

    from tunesmith.eval.run import load_for_inference
    from tunesmith.runtime import resolve_runtime

    hf = AutoModelForCausalLM.from_pretrained(straight / "final", dtype=torch.float32).eval()
    assert type(hf).__name__ == "Gemma3ForCausalLM"
    model, _ = load_for_inference(str(straight / "final"), resolve_runtime("cpu", "fp32"))
    ids = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=0)


def test_image_text_gemma3_trains_its_text_model(tmp_path: Path, tiny_tokenizer_dir: Path,
                                                 demo_text: tuple[Path, Path]) -> None:
    """model.name = an image+text Gemma 3 dir (Gemma3ForConditionalGeneration, as
    google/gemma-3-4b-pt): its text tower trains, the result is a Gemma3ForCausalLM; a LoRA
    adapter merges, and loads in peft on the text model (and on the image+text one with its
    names mapped); generate and eval run on the image+text dir."""
    import shutil

    import peft
    import transformers

    from tests.gemma3_multimodal import save_tiny_gemma3
    from tunesmith.eval.run import load_for_inference
    from tunesmith.runtime import resolve_runtime

    base = tmp_path / "gemma3"
    mm = save_tiny_gemma3(base)
    for f in tiny_tokenizer_dir.iterdir():  # the real checkpoints ship their tokenizer
        shutil.copy(f, base / f.name)
    train, valid = demo_text
    full, lora = tmp_path / "full", tmp_path / "lora"
    assert run(["-q", "train", *_overrides(base, train, full, model=str(base),
                                           **{"train.max_steps": 8})]) == 0
    losses = _losses(full)
    assert losses[8] < losses[1] - 0.4, losses  # measured: 6.93 -> 6.34

    hf = transformers.AutoModelForCausalLM.from_pretrained(full / "final", dtype=torch.float32)
    assert type(hf).__name__ == "Gemma3ForCausalLM" and hf.config.vocab_size == 520
    model, _ = load_for_inference(str(full / "final"), resolve_runtime("cpu", "fp32"))
    ids = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf.eval()(ids).logits, atol=1e-5, rtol=0)

    assert run(["-q", "train", *_overrides(base, train, lora, model=str(base),
                                           **{"train.max_steps": 3, "peft.method": "lora"})]) == 0
    assert run(["-q", "merge", str(base), str(lora / "final"), "--out", str(tmp_path / "m")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert type(merged).__name__ == "Gemma3ForCausalLM"
    with torch.no_grad():
        want = merged.eval()(ids).logits
        assert (want - mm(input_ids=ids).logits).abs().max() > 1e-2  # the adapter changed it
        # peft on a Gemma3ForCausalLM holding the checkpoint's text weights: as trained.
        text = transformers.Gemma3ForCausalLM(mm.config.text_config)
        text.model.load_state_dict(mm.model.language_model.state_dict())
        on_text = peft.PeftModel.from_pretrained(text, lora / "final").eval()
        torch.testing.assert_close(on_text(ids).logits, want, atol=1e-5, rtol=0)
        # On the image+text model its names differ: mapped (what docs/tasks.md tells users), the
        # same logits; as saved, peft finds none of its layers and changes nothing.
        mapped_cfg = peft.LoraConfig.from_pretrained(lora / "final")
        mapped_cfg.target_modules = r".*language_model.*\.(q|k|v|o|gate|up|down)_proj"
        reloaded = transformers.Gemma3ForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
        mapped = peft.PeftModel.from_pretrained(
            reloaded, lora / "final", config=mapped_cfg,
            key_mapping={r"^model\.layers\.": "model.language_model.layers."}).eval()
        torch.testing.assert_close(mapped(input_ids=ids).logits, want, atol=1e-5, rtol=0)

    assert run(["-q", "generate", str(base), "--prompt", "def f", "--max-new-tokens", "4",
                "--device", "cpu"]) == 0
    assert run(["-q", "eval", str(base), "--data", str(valid), "--block-size", "64",
                "--max-batches", "2", "--device", "cpu"]) == 0
