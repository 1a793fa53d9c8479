"""lm-evaluation-harness integration: TunesmithLM against lm_eval's own HF backend (HFLM).

Parity on a tiny random Llama (64 positions, so long requests are left-truncated and texts
span several rolling windows) and on the real stories260K: per-request loglikelihoods and
is_greedy, rolling loglikelihoods and greedy generations on requests built here, then the
same through three task YAMLs run by `lm_eval.simple_evaluate` (multiple choice, word
perplexity, generate_until) over jsonl files written here. Then a PEFT adapter directory
against its merged model, `tunesmith eval --harness` end to end, and its one-line refusals.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import shared_path
from tests.peft_utils import save_base
from tunesmith.cli.main import run

lm_eval = pytest.importorskip("lm_eval", reason="needs lm-eval (the test extra installs it)")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from tunesmith.eval.harness import TunesmithLM  # noqa: E402

TOL = 1e-4  # fp32 loglikelihoods, ours vs HFLM

CONTEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    "The cat sat on the",
    "She went to the park and ",  # a trailing space moves to the continuation
    "Tom and his mom " * 12,  # longer than the tiny model's 64 positions: left-truncated
    "",  # empty context: the prefix token conditions the continuation
]
CONTINUATIONS = [" She liked to play.", " mat", "played with her ball", " went home.", "One day"]
TEXTS = [
    "Lily saw a big dog. The dog was happy and wanted to play with her in the sun.",
    "Once upon a time there was a boy who liked to build tall towers out of blocks. " * 3,
    "It was a sunny day.",
]
PROMPTS = ["Once upon a time", "The little dog was", "One day, Tom found a", "Sara"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A random tiny Llama (vocab 512, 64 positions) in HF format with the tiny BPE tokenizer."""
    from transformers import AutoTokenizer

    d = save_base(tmp_path_factory.mktemp("harness"), vocab_size=512, max_position_embeddings=64)
    AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir)).save_pretrained(str(d))
    return d


@pytest.fixture(params=["tiny", "stories260K"])
def model_dir(request, tiny_dir) -> Path:
    if request.param == "tiny":
        return tiny_dir
    return shared_path("models", "stories260K", "hf")


def _ours(d: Path, batch_size: int = 3) -> TunesmithLM:
    return TunesmithLM(str(d), batch_size=batch_size, device="cpu", precision="fp32")


def _hf(d: Path, batch_size: int = 3, **kw) -> HFLM:
    return HFLM(pretrained=str(d), batch_size=batch_size, device="cpu", dtype="float32", **kw)


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def _greedy_pair(lm: TunesmithLM, context: str) -> tuple[str, str]:
    """(context, its greedy next two tokens as text), spelled from the decoded ids so the
    pair re-tokenizes to the same tokens (SentencePiece drops a leading space otherwise)."""
    ids = lm.tok_encode(context)
    for _ in range(2):
        with torch.no_grad():
            ids = ids + [int(lm.model(torch.tensor([ids]))[0, -1].argmax())]
    head = lm.tok_decode(ids[:len(ids) - 2])
    return head, lm.tok_decode(ids)[len(head):]


def _ll_requests(lm: TunesmithLM) -> list[Instance]:
    """CONTEXTS x CONTINUATIONS, multiple-choice style one-token answers sharing a context,
    and greedy continuations (so is_greedy is True somewhere)."""
    pairs = [(c, k) for c in CONTEXTS for k in CONTINUATIONS[:3]] + list(zip(CONTEXTS, CONTINUATIONS))
    pairs += [("The cat sat on the", w) for w in (" a", " b", " c", " d")]
    pairs += [_greedy_pair(lm, c) for c in CONTEXTS[:3]]
    return _requests("loglikelihood", pairs)


def test_requests_match_hflm(model_dir):
    ours, hf = _ours(model_dir), _hf(model_dir)
    reqs = _ll_requests(ours)
    a, b = ours.loglikelihood(reqs), hf.loglikelihood(reqs)
    diff = max(abs(x[0] - y[0]) for x, y in zip(a, b, strict=True))
    print(f"\n{model_dir.name}: {len(reqs)} loglikelihoods, max |ours - HFLM| = {diff:.2e}")
    assert diff < TOL
    assert [x[1] for x in a] == [y[1] for y in b]
    assert any(x[1] for x in a), "no greedy continuation among the requests: is_greedy untested"
    # Batch-size independence: one request per forward gives the same numbers.
    single = _ours(model_dir, batch_size=1).loglikelihood(reqs)
    assert max(abs(x[0] - y[0]) for x, y in zip(a, single, strict=True)) < TOL

    gen = _requests("generate_until", [(p, {"until": [".", "\n"], "max_gen_toks": 24}) for p in PROMPTS])
    assert ours.generate_until(gen) == hf.generate_until(gen)


def test_rolling_match_hflm(model_dir):
    """Whole-text loglikelihoods over rolling windows (the tiny model's 64 positions give
    several windows per text). HFLM's reference runs without its logits cache: with it, and
    batch_size > 1, repeated identical windows score differently from batch_size=1
    (lm_eval 0.4.13); ours gives the batch_size=1 numbers at every batch size."""
    reqs = _requests("loglikelihood_rolling", [(t,) for t in TEXTS])
    a = _ours(model_dir).loglikelihood_rolling(reqs)
    b = _hf(model_dir, logits_cache=False).loglikelihood_rolling(reqs)
    c = _ours(model_dir, batch_size=1).loglikelihood_rolling(reqs)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < TOL * 10  # sums of many windows
    assert max(abs(x - y) for x, y in zip(a, c, strict=True)) < 1e-4


# ------------------------------------------------------------------- local tasks through lm_eval
def _write_tasks(root: Path) -> Path:
    """Three task YAMLs over jsonl files: multiple choice, word perplexity, generate_until."""
    root.mkdir(parents=True, exist_ok=True)
    mc = [{"question": "The cat sat on the", "choices": [" mat", " moon", " dog"], "label": 0},
          {"question": "Lily went to the park and", "choices": [" played", " sang", " slept"], "label": 0},
          {"question": "One day, a big", "choices": [" dog", " tree", " car"], "label": 1},
          {"question": "Tom was very", "choices": [" happy", " sad"], "label": 0}]
    ppl = [{"text": t} for t in TEXTS]
    gen = [{"prompt": p, "answer": " there was a little girl"} for p in PROMPTS]
    for name, rows in (("mc", mc), ("ppl", ppl), ("gen", gen)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ntest_split: train\n"
    (root / "ts_mc.yaml").write_text(
        f"task: ts_mc\n{common}dataset_kwargs:\n  data_files: {root / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: choices\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (root / "ts_ppl.yaml").write_text(
        f"task: ts_ppl\n{common}dataset_kwargs:\n  data_files: {root / 'ppl.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n")
    (root / "ts_gen.yaml").write_text(
        f"task: ts_gen\n{common}dataset_kwargs:\n  data_files: {root / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['.', '\\n']\n  max_gen_toks: 16\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return root


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    return _write_tasks(tmp_path_factory.mktemp("tasks"))


def _local(task_dir: Path):
    """The task index of task_dir alone (indexing lm_eval's own tasks takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(task_dir), include_defaults=False)


def _evaluate(lm, task_dir: Path) -> dict:
    return lm_eval.simple_evaluate(model=lm, tasks=["ts_mc", "ts_ppl", "ts_gen"],
                                   task_manager=_local(task_dir),
                                   bootstrap_iters=0, log_samples=True)


def test_local_tasks_match_hflm(model_dir, task_dir):
    ours, hf = _evaluate(_ours(model_dir), task_dir), _evaluate(_hf(model_dir), task_dir)
    for task in ("ts_mc", "ts_ppl", "ts_gen"):
        for key, value in hf["results"][task].items():
            if isinstance(value, float) and "stderr" not in key:
                assert math.isclose(ours["results"][task][key], value, rel_tol=1e-5), (task, key)
        mine, ref = ours["samples"][task], hf["samples"][task]
        assert len(mine) == len(ref) > 0
        for x, y in zip(mine, ref, strict=True):
            if task == "ts_gen":
                assert x["filtered_resps"] == y["filtered_resps"]
            elif task == "ts_mc":  # [(loglikelihood, is_greedy)] per choice
                for (lx, gx), (ly, gy) in zip(x["filtered_resps"], y["filtered_resps"], strict=True):
                    assert abs(lx - ly) < TOL and gx == gy
            else:  # [loglikelihood of the whole text]
                assert abs(x["filtered_resps"][0] - y["filtered_resps"][0]) < TOL * 10
    assert ours["results"]["ts_ppl"]["word_perplexity,none"] > 1


def test_registered_model_type(tiny_dir, task_dir):
    """`--model tunesmith --model_args pretrained=DIR` resolves through lm_eval's registry."""
    out = lm_eval.simple_evaluate(
        model="tunesmith", model_args=f"pretrained={tiny_dir},device=cpu,precision=fp32,batch_size=2",
        tasks=["ts_mc"], task_manager=_local(task_dir), bootstrap_iters=0)
    assert 0.0 <= out["results"]["ts_mc"]["acc,none"] <= 1.0
    with pytest.raises(Exception, match="unknown bogus"):
        lm_eval.api.registry.get_model("tunesmith").create_from_arg_string(f"pretrained={tiny_dir},bogus=1")


# ------------------------------------------------------------------- PEFT adapter = merged model
def test_adapter_dir_equals_merged(tiny_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    from tests.peft_utils import load_ours
    from tunesmith.peft import LoRASpec, apply_lora, save_adapter

    model, family, cfg = load_ours(tiny_dir)
    apply_lora(model, family.adapter(cfg), LoRASpec(r=4, alpha=8), "all-linear")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B = 0 at init would make the adapter a no-op
                p.normal_(0.0, 0.2, generator=gen)
    adapter = save_adapter(model, family.adapter(cfg), tmp_path / "adapter", base_model=str(tiny_dir),
                           tokenizer=AutoTokenizer.from_pretrained(str(tiny_dir)))
    assert run(["merge", str(tiny_dir), str(adapter), "--out", str(tmp_path / "merged")]) == 0
    reqs = _requests("loglikelihood", list(zip(CONTEXTS, CONTINUATIONS)))
    a = _ours(adapter).loglikelihood(reqs)
    m = _ours(tmp_path / "merged").loglikelihood(reqs)
    base = _ours(tiny_dir).loglikelihood(reqs)
    assert max(abs(x[0] - y[0]) for x, y in zip(a, m, strict=True)) < TOL
    assert max(abs(x[0] - y[0]) for x, y in zip(a, base, strict=True)) > 1e-2  # the adapter counts
    gen_reqs = _requests("generate_until", [(p, {"until": ["\n"], "max_gen_toks": 12}) for p in PROMPTS])
    assert _ours(adapter).generate_until(gen_reqs) == _ours(tmp_path / "merged").generate_until(gen_reqs)
    capsys.readouterr()
    texts = []
    for d in (adapter, tmp_path / "merged"):  # `tunesmith generate` takes the adapter dir too
        assert run(["generate", str(d), "--prompt", "Once upon", "--device", "cpu",
                    "--max-new-tokens", "8"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].strip()


def test_llama_adapter_dir(tiny_dir, tmp_path):
    """A Llama-Adapter (ADAPTION_PROMPT) directory scores as the adapted model it was saved from."""
    from transformers import AutoTokenizer

    from tests.peft_utils import load_ours
    from tunesmith.models.registry import adaption_point
    from tunesmith.peft import apply_adaption_prompt, init_adaption, save_adaption

    model, family, cfg = load_ours(tiny_dir)
    point = adaption_point(cfg.model_type)
    apply_adaption_prompt(model, point, adapter_len=4, adapter_layers=1)
    init_adaption(model, seed=0)
    with torch.no_grad():
        model.layers[1].attention.adaption_gate.fill_(0.5)  # zero-init gate: a no-op adapter
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    d = save_adaption(model, point, family.adapter(cfg), tmp_path / "ad", base_model=str(tiny_dir),
                      tokenizer=tok)
    reqs = _requests("loglikelihood", list(zip(CONTEXTS, CONTINUATIONS)))
    loaded = _ours(d).loglikelihood(reqs)
    direct = TunesmithLM(model, tokenizer=tok, batch_size=3, device="cpu", precision="fp32").loglikelihood(reqs)
    base = _ours(tiny_dir).loglikelihood(reqs)
    assert max(abs(x[0] - y[0]) for x, y in zip(loaded, direct, strict=True)) < 1e-5
    assert max(abs(x[0] - y[0]) for x, y in zip(loaded, base, strict=True)) > 1e-2


# ------------------------------------------------------------------- the CLI
def test_cli_harness_end_to_end(tiny_dir, task_dir, tmp_path, capsys):
    out = tmp_path / "res" / "results.json"
    code = run(["eval", str(tiny_dir), "--harness", "ts_mc,ts_ppl,ts_gen", "--include-path",
                str(task_dir), "--limit", "3", "--batch-size", "2", "--device", "cpu",
                "--precision", "fp32", "--output", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "ts_mc" in printed and "word_perplexity" in printed and "exact_match" in printed
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"ts_mc", "ts_ppl", "ts_gen"}
    assert data["config"]["model"] == "tunesmith"
    assert data["n-samples"]["ts_mc"]["effective"] == 3


def _fails(argv: list[str], capsys, needle: str) -> str:
    code = run([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ": error" in ln]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    return lines[0]


def test_cli_bad_input(tiny_dir, task_dir, tmp_path, capsys, monkeypatch):
    args = ["--include-path", str(task_dir), "--device", "cpu"]
    _fails(["eval", tiny_dir, "--harness", "ts_mcq", *args], capsys, "did you mean 'ts_mc'")
    _fails(["eval", tmp_path, "--harness", "ts_mc", *args], capsys, "has no config.json")
    _fails(["eval", tiny_dir, "--harness", "ts_mc", "--include-path", tmp_path / "nope"], capsys,
           "no such directory")
    (tmp_path / "out").mkdir()
    _fails(["eval", tiny_dir, "--harness", "ts_mc", "--limit", "1", "--output", tmp_path / "out", *args],
           capsys, "is a directory")
    _fails(["eval", tiny_dir, "--harness", "ts_mc", "--data", "x.txt", *args], capsys, "no --data")
    # A task whose data set lives on an unreachable hub (offline here): one line, not a traceback.
    hub = tmp_path / "hub_tasks"
    hub.mkdir()
    (hub / "ts_hub.yaml").write_text(
        "task: ts_hub\ndataset_path: tunesmith-test/unreachable\ntest_split: train\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: choices\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fails(["eval", tiny_dir, "--harness", "ts_hub", "--include-path", hub, "--device", "cpu"], capsys,
           "cannot fetch the task's data")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    _fails(["eval", tiny_dir, "--harness", "ts_mc"], capsys, "pip install lm-eval")


def test_cli_refuses_encoder(task_dir, tmp_path, capsys, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from tunesmith.models import build_model, init_random, resolve_model_config, save_pretrained

    family, cfg = resolve_model_config("roberta-tiny")
    model = build_model(family, cfg, device="meta")
    init_random(model, "cpu", torch.float32, 0)
    save_pretrained(model, family, cfg, tmp_path / "enc",
                    tokenizer=AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir)))
    _fails(["eval", tmp_path / "enc", "--harness", "ts_mc", "--include-path", task_dir, "--device", "cpu"],
           capsys, "is an encoder")
