"""Bad input for the features of the last sessions, one kind per case: preference tuning
(`task: dpo`), native Gemma 3 (and its image+text checkpoints), native MoE (experts, the router
loss, LoRA on experts, TP / EP) and export of what those runs save. Each case asserts the one
`error:` line (what and where), exit code 2, no traceback and nothing written.

Everything runs in-process through `tunesmith.cli.main.run`, as tests/integration/
test_bad_input_battery.py does; the multi-rank refusals set a torchrun-style environment with no
peers and fail the test if a process group is ever started (they fire before any comms).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from tests.conftest import REPO, shared_path
from tests.integration.test_bad_input_battery import _train_argv, fails
from tunesmith.cli.main import run

DPO_RECIPE = REPO / "recipes" / "llama_dpo_lora.yaml"
SAMPLE = REPO / "recipes" / "data" / "preference_sample.jsonl"
QUICK = ["train.precision=fp32", "logging.progress=false", "eval.every_steps=null",
         "eval.at_end=false", "train.max_steps=1"]
DENSE = ("model.overrides={vocab_size: 512, dim: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2, "
         "intermediate_size: 128}")


@pytest.fixture(scope="module")
def pairs() -> list[dict]:
    shared_path("models", "stories260K", "hf")  # the recipe's model
    return [json.loads(line) for line in SAMPLE.read_text().splitlines()][:6]


def _dpo_argv(out: Path, *extra: object) -> list[object]:
    return ["train", DPO_RECIPE, f"output.dir={out}", *QUICK, *extra]


def _jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


# ------------------------------------------------------------ 1. preference records (task=dpo)
BAD_RECORDS = {  # name: (the third record, the message's tail)
    "missing_chosen": ({"prompt": "p", "rejected": "r"}, "missing field 'chosen'"),
    "empty_chosen": ({"prompt": "p", "chosen": "", "rejected": "r"}, "empty response in field 'chosen'"),
    "int_chosen": ({"prompt": "p", "chosen": 5, "rejected": "r"}, "field 'chosen' holds int, expected a string"),
    "null_rejected": ({"prompt": "p", "chosen": "c", "rejected": None}, "null field 'rejected'"),
    "prompt_only": ({"prompt": "p"}, "missing field 'chosen'"),
    "sft_record": ({"instruction": "a", "output": "b"}, "missing field 'prompt'"),
    "list_line": ("[1, 2, 3]", "expected a JSON object, got list"),
    "string_line": ('"just a string"', "expected a JSON object, got str"),
    "cut_json": ('{"prompt": "x", "chosen": ', "malformed JSON line"),
    "unknown_role": ({"chosen": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}],
                      "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "c"}]},
                     "chosen[1]: unknown role 'robot'"),
}


@pytest.mark.parametrize("kind", sorted(BAD_RECORDS))
def test_bad_preference_record(kind, pairs, tmp_path, capsys):
    record, needle = BAD_RECORDS[kind]
    data = _jsonl(tmp_path / "prefs.jsonl", [*pairs[:2], record, *pairs[2:]])
    out = tmp_path / "out"
    fails(_dpo_argv(out, f"data.path={data}"), capsys, f"{data}: record 3 (line 3)", needle,
          absent=(out,), unchanged=(tmp_path,))


def test_preference_csv_without_a_column(pairs, tmp_path, capsys):
    data = tmp_path / "prefs.csv"
    data.write_text("prompt,chosen\n" + "".join(f'"{p["prompt"]}","{p["chosen"]}"\n' for p in pairs))
    out = tmp_path / "out"
    fails(_dpo_argv(out, f"data.path={data}"), capsys, f"{data}:3", "missing field 'rejected'",
          absent=(out,))


def test_every_pair_identical(pairs, tmp_path, capsys):
    data = _jsonl(tmp_path / "same.jsonl", [dict(p, rejected=p["chosen"]) for p in pairs])
    out = tmp_path / "out"
    fails(_dpo_argv(out, f"data.path={data}"), capsys, str(data), "every preference pair was dropped",
          "'dropped_identical': 4", absent=(out,))


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_preference_file(content, tmp_path, capsys):
    """Before: 'data has 0 records, too few to hold out 25.0%' (no file named)."""
    data = tmp_path / "empty.jsonl"
    data.write_text(content)
    out = tmp_path / "out"
    fails(_dpo_argv(out, f"data.path={data}"), capsys, f"{data}: holds no records", absent=(out,))
    fails(["data", "inspect", DPO_RECIPE, f"data.path={data}"], capsys, f"{data}: holds no records")


def test_empty_validation_file(pairs, tmp_path, capsys):
    """Before: training ran without any evaluation, silently."""
    empty = tmp_path / "val.jsonl"
    empty.write_text("")
    data = _jsonl(tmp_path / "prefs.jsonl", pairs)
    out = tmp_path / "out"
    fails(_dpo_argv(out, f"data.path={data}", f"data.validation_path={empty}",
                    "data.validation_split_percentage=0"), capsys, f"{empty}: holds no records",
          absent=(out,))


def test_validation_pairs_all_dropped(pairs, tmp_path, capsys):
    """Before: every validation pair identical -> no evaluation at all, not a word."""
    val = _jsonl(tmp_path / "val.jsonl", [dict(p, rejected=p["chosen"]) for p in pairs])
    data = _jsonl(tmp_path / "prefs.jsonl", pairs)
    out = tmp_path / "out"
    fails(_dpo_argv(out, f"data.path={data}", f"data.validation_path={val}",
                    "data.validation_split_percentage=0", "eval.at_end=true"), capsys,
          f"{val}: every validation preference pair was dropped", absent=(out,))


def test_empty_sft_validation_file(tmp_path, capsys):
    shared_path("models", "stories260K", "hf")
    empty = tmp_path / "val.json"
    empty.write_text("")
    out = tmp_path / "out"
    fails(["train", REPO / "recipes" / "llama_sft_alpaca.yaml", f"output.dir={out}", *QUICK,
           f"data.validation_path={empty}"], capsys, f"{empty}: holds no records", absent=(out,))


# ------------------------------------------------------------ 2. dpo.* values and combinations
@pytest.mark.parametrize("extra, needles", [
    (["dpo.beta=0"], ("dpo.beta", "greater than 0")),
    (["dpo.beta=-1"], ("dpo.beta", "greater than 0")),
    (["dpo.beta=inf"], ("dpo.beta", "finite number")),  # before: a NaN loss at step 1, exit 3
    (["dpo.beta=nan"], ("dpo.beta",)),
    (["dpo.beta=big"], ("dpo.beta", "'big'")),
    (["dpo.label_smoothing=0.5"], ("dpo.label_smoothing", "less than 0.5")),
    (["dpo.label_smoothing=-0.1"], ("dpo.label_smoothing", "greater than or equal to 0")),
    (["dpo.loss=ipo", "dpo.label_smoothing=0.1"], ("label_smoothing applies to dpo.loss=sigmoid, not ipo",)),
    # before: accepted and ignored (the sigmoid loss has no margin)
    (["dpo.simpo_gamma=2.0"], ("dpo.simpo_gamma applies to dpo.loss=simpo, not sigmoid",)),
    (["dpo.loss=simpo", "dpo.simpo_gamma=-1"], ("dpo.simpo_gamma", "greater than or equal to 0")),
    (["dpo.simpo_gamma=inf", "dpo.loss=simpo"], ("dpo.simpo_gamma", "finite number")),
    (["dpo.loss=kto"], ("dpo.loss", "'kto'")),
    (["dpo.betta=0.1"], ("unknown key 'dpo.betta'", "did you mean 'dpo.beta'")),
    (["dpo.loss=simpo", "dpo.precompute_reference=true"], ("dpo.loss=simpo has no reference policy",)),
    (["dpo.precompute_reference=true", "sft.packing=true"], ("sft.packing is not supported",)),
    (["dpo.precompute_reference=true", "parallel.cp=2"], ("context parallelism",)),
    (["data.streaming=true"], ("data.streaming is not supported",)),
    (["peft.method=llama_adapter"], ("llama_adapter is not supported",)),
    (["train.router_aux_loss_coef=0.01"], ("task=dpo: train.router_aux_loss_coef is not supported",)),
    (["sft.train_on_inputs=true"], ("never trains on prompts",)),
    # before: the dpo section was ignored without a word under another task
    (["task=sft", "dpo.beta=0.5"], ("dpo.beta=0.5 applies to task=dpo, not task=sft",)),
    (["sft.overlong=error", "data.block_size=8"], (str(SAMPLE), "(chosen)", "more than data.block_size=8")),
    (["data.block_size=1"], (str(SAMPLE), "every preference pair was dropped")),
])
def test_bad_dpo_settings(extra, needles, pairs, tmp_path, capsys):
    out = tmp_path / "out"
    fails(_dpo_argv(out, *extra), capsys, *needles, absent=(out,))


def test_dpo_tokenizer_larger_than_the_vocabulary(tmp_path, capsys):
    tok = shared_path("tokenizers", "llama3", "hf")
    out = tmp_path / "out"
    fails(_dpo_argv(out, f"model.tokenizer={tok}"), capsys, str(tok), "128256 tokens",
          "vocab_size is 512", absent=(out,))


# ------------------------------------------------------------ 3. MoE and dense-model mix-ups
def _tiny_argv(tok: Path, data: Path, out: Path, model: str, *extra: str, ov: str = "model.overrides={}"):
    return ["train", f"model.name={model}", f"model.tokenizer={tok}", ov, f"data.path={data}",
            "data.block_size=32", "train.micro_batch_size=2", "train.max_steps=1",
            "train.precision=fp32", "logging.progress=false", f"output.dir={out}", *extra]


@pytest.mark.parametrize("model, extra, needles", [
    ("moe-tiny", ["train.router_aux_loss_coef=-1"], ("train.router_aux_loss_coef", "greater than or equal")),
    # before: accepted, the loss went inf at step 1 (exit 3, files written)
    ("moe-tiny", ["train.router_aux_loss_coef=inf"], ("train.router_aux_loss_coef", "finite number")),
    ("moe-tiny", ["train.router_aux_loss_coef=0.01", "parallel.mlp_chunk_size=16"], ("mlp_chunk_size",)),
    ("moe-tiny", ["model.overrides={num_experts_per_tok: 9}"], ("num_experts_per_tok (9) exceeds num_experts (8)",)),
    ("moe-tiny", ["model.overrides={num_experts_per_tok: 0}"], ("num_experts_per_tok must be positive",)),
    ("moe-tiny", ["peft.method=llama_adapter"], ("llama_adapter is not available", "'qwen3_moe'")),
    ("moe-tiny", ["peft.method=lora", "peft.dropout=0", "peft.target_parameters=[experts.gate_proj]"],
     ("['experts.gate_proj'] match no expert weight", "gate_up_proj")),
    ("moe-tiny", ["peft.method=dora", "peft.target_parameters=[w13]"], ("needs peft.method=lora or qlora, not dora",)),
    ("moe-tiny", ["parallel.ep=0"], ("parallel.ep", "greater than or equal to 1")),
    ("tiny", ["peft.method=lora", "peft.dropout=0", "peft.target_parameters=[experts.gate_up_proj]", DENSE],
     ("Llama has no stacked expert weights",)),
    ("tiny", ["train.router_aux_loss_coef=0.01", DENSE], ("model type 'llama' has no experts",)),
    ("gemma3-tiny", ["peft.method=llama_adapter"], ("llama_adapter is not available", "'gemma3_text'")),
    ("gemma3-tiny", ["model.overrides={final_logit_softcapping: 30.0}"], ("unknown key 'final_logit_softcapping'",)),
    ("gemma3-tiny", ["model.overrides={sliding_window: 0}"], ("sliding_window must be a positive integer",)),
    # before: "... got 1 (ok)"
    ("gemma3-tiny", ["model.overrides={layer_types: [full_attention]}"], ("layer_types must list 4 entries", "got 1 entries")),
    ("gemma3-tiny", ["model.overrides={layer_types: [full_attention, bogus, full_attention, full_attention]}"],
     ("got unknown kinds ['bogus']",)),
])
def test_bad_moe_and_gemma_settings(model, extra, needles, tiny_tokenizer_dir, demo_text, tmp_path, capsys):
    out = tmp_path / "out"
    fails(_tiny_argv(tiny_tokenizer_dir, demo_text[0], out, model, *extra), capsys, *needles,
          absent=(out,))


@pytest.mark.parametrize("world, model, extra, needle", [
    (2, "tiny", ["parallel.ep=2", DENSE], "parallel.ep=2: model type 'llama' has no experts"),
    (3, "moe-tiny", ["parallel.ep=3"], "parallel.ep=3 must divide the model's num_experts=8"),
    (3, "moe-tiny", ["parallel.tp=3"], "parallel.tp=3 must divide the model's n_heads=4"),
    (2, "moe-tiny", ["parallel.ep=2", "parallel.tp=2"], "composes with FSDP2 only"),
    (2, "moe-tiny", ["parallel.ep=2", "parallel.strategy=no_shard"], "not no_shard"),
    (2, "tiny", ["parallel.tp=2", "data.mode=lines", "data.pad_to_multiple_of=3", DENSE],
     "data.pad_to_multiple_of (lines mode)=3 must be a multiple of 2"),
    (2, "tiny", ["parallel.cp=2", "task=dpo", DENSE], "task=dpo: context parallelism"),
])
def test_multi_rank_refusals_before_any_process_group(world, model, extra, needle, tiny_tokenizer_dir,
                                                       demo_text, tmp_path, monkeypatch, capsys):
    """Rank 0 of a `world`-process job (environment only, no peers) refuses before comms."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("no process group"))
    out = tmp_path / "out"
    line = fails(_tiny_argv(tiny_tokenizer_dir, demo_text[0], out, model, *extra), capsys, needle,
                 absent=(out,))
    assert "(rank 0)" in line and not dist.is_initialized()


def test_moe_tokenizer_larger_than_the_vocabulary(demo_text, tmp_path, capsys):
    tok = shared_path("tokenizers", "gpt2", "hf")
    out = tmp_path / "out"
    fails(_tiny_argv(tok, demo_text[0], out, "moe-tiny"), capsys, str(tok), "50257 tokens",
          "vocab_size is 512", absent=(out,))


# ------------------------------------------------------------ 4. image+text Gemma 3 checkpoints
@pytest.fixture(scope="module")
def gemma3_mm(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    from tests.gemma3_multimodal import save_tiny_gemma3

    d = tmp_path_factory.mktemp("g3") / "ok"
    save_tiny_gemma3(d)
    return d


def _damaged(src: Path, dst: Path, damage: str) -> Path:
    shutil.copytree(src, dst)
    weights, cfg = dst / "model.safetensors", json.loads((dst / "config.json").read_text())
    tensors = load_file(weights)
    down = "language_model.model.layers.1.mlp.down_proj.weight"
    q = "language_model.model.layers.1.self_attn.q_proj.weight"
    if damage == "missing":
        tensors.pop(down)
    elif damage == "shape":
        tensors[q] = tensors[q][:-1].clone()
    elif damage == "truncated":
        raw = weights.read_bytes()
        weights.write_bytes(raw[: len(raw) // 2])
        return dst
    elif damage == "no_text_config":
        cfg.pop("text_config")
    elif damage == "softcapping":
        cfg["text_config"]["final_logit_softcapping"] = 30.0
    save_file(tensors, str(weights), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("damage, needles", [
    ("missing", ("is missing tensors", "layers.1.feed_forward.w2.weight")),
    ("shape", ("shape mismatch", "language_model.model.layers.1.self_attn.q_proj.weight [63, 64]")),
    ("truncated", ("model.safetensors: not a readable safetensors file", "damaged or incomplete")),
    ("no_text_config", ("model_type 'gemma3' without a text_config",)),
    ("softcapping", ("final_logit_softcapping=30.0 is not supported",)),
])
def test_damaged_image_text_gemma(damage, needles, gemma3_mm, tiny_tokenizer_dir, demo_text, tmp_path,
                                  capsys):
    model = _damaged(gemma3_mm, tmp_path / damage, damage)
    out = tmp_path / "out"
    fails(_tiny_argv(tiny_tokenizer_dir, demo_text[0], out, str(model)), capsys, *needles,
          absent=(out,), unchanged=(model,))


# ------------------------------------------------------------ 5. what DPO runs save
@pytest.fixture(scope="module")
def dpo_runs(tmp_path_factory, pairs) -> dict[str, Path]:
    """One-step LoRA and layer-freezing DPO runs, each with a step-1 checkpoint."""
    root = tmp_path_factory.mktemp("dpo_runs")
    runs = {"lora": root / "lora", "freeze": root / "freeze"}
    extra = {"lora": [], "freeze": ["peft.method=none", "peft.num_freeze_layers=3"]}
    for name, out in runs.items():
        assert run([str(a) for a in _dpo_argv(out, "checkpoint.every_steps=1", *extra[name])]) == 0
    return runs


@pytest.mark.parametrize("kind, needle", [
    ("lora", "(peft.method=lora)"), ("freeze", "(peft.freeze_layers / num_freeze_layers")])
def test_export_of_a_trained_only_checkpoint(kind, needle, dpo_runs, tmp_path, capsys):
    """Before: 'does not match its hf/config.json: layers.0.attention.wk.weight is missing'."""
    run_dir, dest = dpo_runs[kind], tmp_path / "exported"
    fails(["export", run_dir, "--out", dest], capsys, str(run_dir / "checkpoints"),
          "holds only the tensors its run trained", needle, "use the run's final/",
          absent=(dest,), unchanged=(run_dir,))


def test_merge_of_a_dpo_adapter_into_itself_or_a_full_model(dpo_runs, tmp_path, capsys):
    base, final = shared_path("models", "stories260K", "hf"), dpo_runs["lora"] / "final"
    fails(["merge", base, final, "--out", final], capsys, "must differ from the base and adapter",
          unchanged=(final,))
    fails(["merge", base, dpo_runs["freeze"] / "final", "--out", tmp_path / "m"], capsys,
          "is not a PEFT adapter directory (no adapter_config.json)", absent=(tmp_path / "m",))


@pytest.mark.parametrize("change, needle", [
    ("dpo.loss=ipo", "dpo.loss (checkpoint: 'sigmoid', now: 'ipo')"),
    ("sft.chat_template=chatml", "sft.chat_template (checkpoint: 'alpaca', now: 'chatml')"),
])
def test_resume_with_another_objective_or_rendering(change, needle, dpo_runs, capsys):
    """Before: accepted, the run went on with another loss or other rows from the resume step."""
    out = dpo_runs["lora"]
    argv = [*_dpo_argv(out, "checkpoint.every_steps=1", "checkpoint.resume=auto", change)]
    argv[argv.index("train.max_steps=1")] = "train.max_steps=2"
    fails(argv, capsys, "cannot resume from", str(out / "checkpoints"), needle, unchanged=(out,))


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_adapter_whose_base_moved(command, dpo_runs, tmp_path, demo_text, capsys):
    """Before: "model '/gone/base' is neither a preset (...) nor ..." with no word of the adapter."""
    adapter = tmp_path / "adapter"
    shutil.copytree(dpo_runs["lora"] / "final", adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "/gone/base"}))
    argv = (["generate", adapter, "--prompt", "Once"] if command == "generate"
            else ["eval", adapter, "--data", demo_text[1], "--max-batches", "1"])
    fails(argv, capsys, f"adapter {adapter} names its base model '/gone/base'",
          "base_model_name_or_path in adapter_config.json", unchanged=(adapter,))


def test_eval_on_a_preference_file_names_its_flag(pairs, tmp_path, capsys):
    """`tunesmith eval` reads text; a preference file has none. Before, the hint named only the
    config key (data.text_column), which that command does not take."""
    data = _jsonl(tmp_path / "prefs.jsonl", pairs)
    fails(["eval", shared_path("models", "stories260K", "hf"), "--data", data], capsys,
          f"{data}:1: text column 'text' not found", "prompt, chosen, rejected", "--text-column")


# ------------------------------------------------------------ kernel A/B switches
def test_bad_kernel_switch_fails_before_any_work(tmp_path, tiny_tokenizer_dir, demo_text, monkeypatch,
                                                  capsys):
    """A typo in TUNESMITH_CE / TUNESMITH_NF4 fails at setup, not at the first loss or matmul."""
    monkeypatch.setenv("TUNESMITH_NF4", "fastest")
    out = tmp_path / "out"
    fails(_train_argv(tiny_tokenizer_dir, out, demo_text[0]), capsys,
          "TUNESMITH_NF4='fastest'", "kernel, compiled", absent=(out,))
