"""parallel/layout.py on CPU: degrees from the strategy, one-line refusals of layouts that cannot
work (world size, the model's heads, the sequence, single-process features, context
parallelism, QLoRA shards), all before any process group exists."""

from __future__ import annotations

import pytest

from tunesmith.cli.main import run
from tunesmith.config import load_config
from tunesmith.config.schema import ParallelConfig
from tunesmith.errors import TunesmithError
from tunesmith.models import resolve_model_config
from tunesmith.parallel.layout import check_run, resolve_layout
from tunesmith.peft import nf4_available


def layout(world: int, local: int | None = None, **kw):
    return resolve_layout(ParallelConfig(**kw), world, local)


# ----------------------------------------------------------------------------- degrees
def test_strategies_resolve_degrees():
    # mesh (dp_replicate, dp_shard, cp, tp)
    assert layout(8).mesh_shape == (1, 8, 1, 1) and layout(8).strategy == "full_shard"
    assert layout(8, tp=2).mesh_shape == (1, 4, 1, 2)
    assert layout(8, strategy="no_shard").mesh_shape == (8, 1, 1, 1)
    assert layout(16, 8, strategy="hybrid_shard").mesh_shape == (2, 8, 1, 1)  # shard in node
    assert layout(16, 8, strategy="hybrid_shard", tp=2).mesh_shape == (2, 4, 1, 2)
    assert layout(8, dp_replicate=2).strategy == "hybrid_shard"
    assert layout(8, strategy="hybrid_shard", dp_shard=1, tp=2).mesh_shape == (4, 1, 1, 2)
    assert layout(1).dp == 1


def test_context_parallel_degrees():
    """cp is given, the data-parallel degrees fill; FSDP2 shards over dp_shard x cp."""
    lay = layout(8, cp=2)
    assert lay.mesh_shape == (1, 4, 2, 1) and lay.dp == 4 and lay.fsdp_shard == 8
    assert layout(2, cp=2).mesh_shape == (1, 1, 2, 1)
    assert layout(8, strategy="no_shard", cp=4).mesh_shape == (2, 1, 4, 1)
    assert layout(16, 8, strategy="hybrid_shard", cp=2).mesh_shape == (2, 4, 2, 1)
    assert "x cp=2" in layout(8, cp=2).describe()


@pytest.mark.parametrize("world, local, kw, message", [
    (8, None, {"dp_shard": 3}, "dp_replicate=1 x dp_shard=3 x tp=1 = 3 do not match the world size 8"),
    (6, None, {"tp": 4}, "parallel.tp=4 does not divide the world size 6"),
    (16, 8, {"tp": 16}, "does not divide the 8 ranks per node"),
    (8, None, {"strategy": "full_shard", "dp_replicate": 2}, "needs strategy=hybrid_shard"),
    (8, None, {"strategy": "no_shard", "dp_shard": 2}, "no_shard replicates every parameter"),
    (8, None, {"strategy": "no_shard", "tp": 2}, "cannot be combined with tp > 1"),
    (8, None, {"strategy": "no_shard", "cpu_offload": True}, "cpu_offload needs a sharded strategy"),
    (8, None, {"dp_replicate": 3}, "cannot fill parallel.dp_shard"),
    (6, None, {"cp": 4}, "parallel.cp=4 (x tp=1) does not divide the world size 6; the ranks must "
                         "form whole context-parallel groups"),
    (8, None, {"cp": 2, "dp_shard": 2}, "dp_replicate=1 x dp_shard=2 x cp=2 x tp=1 = 4 do not match"),
    (8, None, {"ep": 2, "tp": 2}, ("parallel.ep=2 composes with FSDP2 only, not yet with tensor or "
                                   "context parallelism (tp=2, cp=1); set both to 1")),
    (8, None, {"ep": 2, "cp": 2}, "not yet with tensor or context parallelism (tp=1, cp=2)"),
    (8, None, {"ep": 2, "strategy": "no_shard"}, ("parallel.ep=2 needs parallel.strategy full_shard or "
                                                  "shard_grad_op (FSDP2 over every data-parallel rank), "
                                                  "not no_shard")),
    (8, 4, {"ep": 2, "strategy": "hybrid_shard"}, "not hybrid_shard"),
    (6, None, {"ep": 4}, "parallel.ep=4 must divide the data-parallel degree 6"),
    (1, None, {"ep": 2}, "parallel.ep=2 must divide the data-parallel degree 1"),
])
def test_bad_degrees_are_one_clear_line(world, local, kw, message):
    with pytest.raises(TunesmithError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        layout(world, local, **kw)
    assert "\n" not in str(e.value)


def test_expert_parallel_needs_experts_that_split():
    """parallel.ep: an MoE model whose num_experts the degree divides; the layout says so."""
    cfg = load_config(None, ["data.path=x", "parallel.ep=2"])
    lay = resolve_layout(cfg.parallel, 4)
    assert (lay.ep, lay.dp) == (2, 4) and "experts split over ep=2 ranks" in lay.describe()
    moe = resolve_model_config("moe-tiny")[1]
    check_run(cfg, lay, moe, "cpu")
    with pytest.raises(TunesmithError, match="parallel.ep=2: model type 'llama' has no experts"):
        check_run(cfg, lay, _tiny(), "cpu")
    four = load_config(None, ["data.path=x", "parallel.ep=4"])
    odd = resolve_model_config("moe-tiny", {"num_experts": 6})[1]
    with pytest.raises(TunesmithError, match="parallel.ep=4 must divide the model's num_experts=6"):
        check_run(four, resolve_layout(four.parallel, 4), odd, "cpu")


def test_zero_degree_rejected_by_config():
    with pytest.raises(TunesmithError, match="parallel.dp_shard: must be a positive degree or -1"):
        load_config(None, ["data.path=x", "parallel.dp_shard=0"])


def _tiny(**over):
    return resolve_model_config("tiny", {"n_heads": 4, "n_kv_heads": 2, "intermediate_size": 128, **over})[1]


def test_tp_pads_unpacked_sft_and_dpo_rows_whatever_the_block_size():
    """Unpacked SFT / DPO batches are padded to a multiple of tp (data.assembly.pad_multiple):
    an odd data.block_size only caps their length (was refused; a gloo tp=2 DPO run with
    block_size 151 reproduces the one-process run). Packed SFT rows are block_size long."""
    for task in (["task=sft"], ["task=dpo"]):
        cfg = load_config(None, ["data.path=x", "parallel.tp=2", "data.block_size=63", *task])
        check_run(cfg, resolve_layout(cfg.parallel, 2), _tiny(), "cpu")
    packed = load_config(None, ["data.path=x", "parallel.tp=2", "data.block_size=63", "task=sft",
                                "sft.packing=true"])
    with pytest.raises(TunesmithError, match="data.block_size=63 must be a multiple of 2"):
        check_run(packed, resolve_layout(packed.parallel, 2), _tiny(), "cpu")


@pytest.mark.parametrize("overrides, message", [
    (["parallel.tp=4"], "must divide the model's n_kv_heads=2"),
    (["parallel.tp=8"], "must divide the model's n_heads=4"),
    (["parallel.tp=2", "data.block_size=63"], "data.block_size=63 must be a multiple of 2"),
    (["parallel.tp=2", "data.mode=lines"], "data.pad_to_multiple_of (lines mode)=None"),
])
def test_tp_must_fit_the_model_and_sequence(overrides, message):
    cfg = load_config(None, ["data.path=x", *overrides])
    lay = resolve_layout(cfg.parallel, 8)
    with pytest.raises(TunesmithError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_run(cfg, lay, _tiny(), "cpu")


@pytest.mark.parametrize("overrides, message", [
    (["peft.method=lora", "peft.save_merged=true"], "peft.save_merged (merge the saved adapter"),
    (["data.streaming=true", "train.max_steps=5"], "data.streaming run on one process only"),
])
def test_single_process_features_refused_across_ranks(overrides, message):
    cfg = load_config(None, ["data.path=x", *overrides])
    with pytest.raises(TunesmithError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_run(cfg, resolve_layout(cfg.parallel, 2), _tiny(), "cpu")
    check_run(cfg, resolve_layout(cfg.parallel, 1), _tiny(), "cpu")  # one process: fine


@pytest.mark.parametrize("overrides,tp_ok", [(["peft.method=lora"], True), (["peft.num_freeze_layers=1"], True),
                                             (["peft.method=dora"], False),
                                             (["peft.method=llama_adapter", "peft.adapter_layers=1"], False)])
def test_peft_with_data_parallel_and_tp(overrides, tp_ok):
    """Every method composes with FSDP2; LoRA and freezing with TP too, DoRA and Llama-Adapter not."""
    cfg = load_config(None, ["data.path=x", *overrides])
    check_run(cfg, resolve_layout(cfg.parallel, 2), _tiny(), "cpu")  # FSDP2 over 2 ranks: fine
    tp = load_config(None, ["data.path=x", "parallel.tp=2", *overrides])
    if tp_ok:
        check_run(tp, resolve_layout(tp.parallel, 2), _tiny(), "cpu")
        return
    with pytest.raises(TunesmithError, match="not yet with tensor parallelism"):
        check_run(tp, resolve_layout(tp.parallel, 2), _tiny(), "cpu")


def test_tp_needs_a_family_with_a_plan():
    cfg = load_config(None, ["data.path=x", "parallel.tp=2"])
    gpt2 = resolve_model_config("gpt2-tiny")[1]
    with pytest.raises(TunesmithError, match="plan for the Gemma / Llama / MoE family only"):
        check_run(cfg, resolve_layout(cfg.parallel, 2), gpt2, "cpu")
    check_run(load_config(None, ["data.path=x"]), resolve_layout(ParallelConfig(), 2), gpt2, "cpu")


def test_qlora_composes_with_data_parallel_but_not_tp():
    cfg = load_config(None, ["data.path=x", "peft.method=qlora"])
    for strategy in ("full_shard", "hybrid_shard", "no_shard"):
        check_run(cfg, resolve_layout(ParallelConfig(strategy=strategy), 2), _tiny(), "cpu")
    tp = load_config(None, ["data.path=x", "peft.method=qlora", "parallel.tp=2"])
    with pytest.raises(TunesmithError, match="parallel.tp=2: QLoRA's NF4 base weights shard with "
                                             "FSDP2/HSDP/DDP only") as e:
        check_run(tp, resolve_layout(tp.parallel, 2), _tiny(), "cpu")
    assert "\n" not in str(e.value)
    ep = load_config(None, ["data.path=x", "peft.method=qlora", "parallel.ep=2"])
    with pytest.raises(TunesmithError, match="parallel.ep=2: QLoRA's NF4 experts shard with "
                                             "FSDP2/HSDP/DDP only") as e:
        check_run(ep, resolve_layout(ep.parallel, 2), resolve_model_config("moe-tiny")[1], "cpu")
    assert "\n" not in str(e.value)


@pytest.mark.skipif(not nf4_available(), reason="torchao with NF4Tensor is not installed")
def test_qlora_moe_expert_stacks_split_by_rows():
    """An MoE expert stack [E, out, in] is one NF4 tensor [E*out, in]: FSDP2 splits it by those
    rows (whole experts when E divides), and NF4's block rule applies to the whole stack."""
    from tunesmith.models import build_model
    from tunesmith.peft.run import check_layout
    from tunesmith.peft.transform import check_nf4_shards

    pc = load_config(None, ["data.path=x", "peft.method=qlora"]).peft
    over = {"dim": 128, "n_heads": 2, "n_kv_heads": 2, "head_dim": 64}
    family, moe = resolve_model_config("moe-tiny", over)
    check_layout(pc, family, moe, 1)
    with pytest.raises(TunesmithError, match=r"QLoRA over 2 sharded ranks: layers.0.attention.wq "):
        check_layout(pc, family, moe, 2)  # [128, 128] attention weights: one scale block each
    family, wide = resolve_model_config("moe-tiny", {**over, "dim": 256, "moe_intermediate_size": 64,
                                                     "intermediate_size": 256})
    check_layout(pc, family, wide, 2)
    family, odd = resolve_model_config("moe-tiny", {**over, "moe_intermediate_size": 24})
    with pytest.raises(TunesmithError, match=r"QLoRA: layers.0.feed_forward.experts.w2 weight \[8, 128, 24\] "
                                             r"has 24576 elements; NF4 needs a multiple of 16384"):
        # w13 [8, 48, 128] holds 3 x 64 x 256 elements: fine; w2 does not
        check_nf4_shards(build_model(family, odd, device="meta"), family.adapter(odd), 1)


@pytest.mark.skipif(not nf4_available(), reason="torchao with NF4Tensor is not installed")
def test_qlora_nf4_weights_must_split_into_whole_shards():
    """FSDP2 cuts each NF4 weight's codes and scales by rows: 2 shards of a 128x128 weight would
    each hold half of its one 64x256-element scale block. Refused on a meta model, no comms."""
    from tunesmith.peft.run import check_layout

    pc = load_config(None, ["data.path=x", "peft.method=qlora"]).peft
    family, small = resolve_model_config("tiny", {"dim": 128, "n_heads": 4, "n_kv_heads": 4,
                                                  "intermediate_size": 256})
    check_layout(pc, family, small, 1)
    with pytest.raises(TunesmithError, match=r"QLoRA over 2 sharded ranks: layers.0.attention.wq "
                                             r"weight \[128, 128\] cannot be split into 2 NF4 shards"):
        check_layout(pc, family, small, 2)
    family, wide = resolve_model_config("tiny", {"dim": 256, "n_heads": 4, "n_kv_heads": 2,
                                                 "intermediate_size": 512})
    check_layout(pc, family, wide, 2)  # every weight holds 2 x 64 x 256 elements or more


@pytest.mark.parametrize("overrides, model, message", [
    (["parallel.cp=2", "data.block_size=66"], "tiny", "parallel.cp=2 cuts each sequence into 2 x cp = 4 "
     "equal chunks (rank i holds chunks i and 3-i); data.block_size=66 is not a multiple of 4"),
    (["parallel.cp=2", "data.mode=lines"], "tiny", "parallel.cp=2 needs packed sequences (data.mode=packed)"),
    (["parallel.cp=2", "task=sft"], "tiny", "parallel.cp=2 with task=sft needs sft.packing=true"),
    (["parallel.cp=2"], "gpt2-tiny", "parallel.cp=2: context parallelism has ring attention for the "
     "gemma3, gemma3_text, llama, mistral, mixtral, qwen2, qwen3, qwen3_moe model types only, not "
     "'gpt2'; use parallel.cp=1"),
    (["parallel.cp=2", "parallel.tp=2"], "tiny", "parallel.cp=2 with parallel.tp=2: context parallelism "
     "composes with data parallelism"),
    (["parallel.cp=2", "task=mlm"], "roberta-tiny", "not 'roberta'"),
])
def test_context_parallel_refuses_what_it_cannot_split(overrides, model, message):
    cfg = load_config(None, ["data.path=x", *overrides])
    mcfg = _tiny() if model == "tiny" else resolve_model_config(model)[1]
    with pytest.raises(TunesmithError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        check_run(cfg, resolve_layout(cfg.parallel, 4), mcfg, "cpu")
    assert "\n" not in str(e.value)
    ok = load_config(None, ["data.path=x", "parallel.cp=2", "data.block_size=64"])
    check_run(ok, resolve_layout(ok.parallel, 4), _tiny(), "cpu")
    sft = load_config(None, ["data.path=x", "parallel.cp=2", "task=sft", "sft.packing=true"])
    check_run(sft, resolve_layout(sft.parallel, 2), _tiny(), "cpu")


def test_context_parallel_bad_input_exits_2_before_any_process_group(tiny_tokenizer_dir, monkeypatch, capsys):
    """A rank of a 4-process job (environment only: no peers exist) refuses cp=3 at once."""
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("no process group"))
    code = run(["train", "data.path=x", "model.name=tiny", f"model.tokenizer={tiny_tokenizer_dir}",
                "parallel.cp=3"])
    assert code == 2 and not dist.is_initialized()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tunesmith: error (rank 0): parallel.cp=3 (x tp=1) does not divide the world size 4; "
                   "the ranks must form whole context-parallel groups"]
