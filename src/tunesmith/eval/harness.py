"""lm-evaluation-harness model "tunesmith": harness tasks on tunesmith's own model code.

`TunesmithLM` implements lm_eval's `LM` interface (through `TemplateLM`, which turns
(context, continuation) strings into token lists the way every lm_eval backend does):

    loglikelihood          log P(continuation | context) and whether greedy decoding yields it
    loglikelihood_rolling  the whole text's log-likelihood over disjoint max_length windows
    generate_until         batched KV-cached generation, stopped at EOS or any `until` string

Semantics follow lm_eval's HF backend (`HFLM`), so scores compare with published HF numbers:
context + continuation tokens left-truncated to max_length + 1 (the last one is never fed),
log-softmax in fp32 over the continuation positions only, requests sorted longest first and
batched with right padding (a causal model's earlier positions never see the padding, so a
score does not depend on the batch size beyond float noise), one forward per group of
requests that share context + continuation[:-1] (multiple choice with one-token answers).

The module imports lm_eval at the top; `tunesmith.eval.harness_run` checks it is installed.
Importing this module registers the model type "tunesmith" with lm_eval.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.eval.generation import generate_batched
from tunesmith.eval.run import load_for_inference
from tunesmith.models import get_family, usable_positions
from tunesmith.runtime import Runtime, resolve_runtime

log = logging.getLogger("tunesmith")

# A (context, continuation) request as TemplateLM hands it over: (strings or None, ids, ids).
TokenRequest = tuple[Any, list[int], list[int]]
_SAMPLING_KEYS = {"do_sample", "temperature", "top_k", "top_p", "until", "max_gen_toks"}


def _as_int(value: Any, name: str) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise TunesmithError(f"tunesmith model_args: {name} must be an integer, got {value!r}") from None
    if out < 1:
        raise TunesmithError(f"tunesmith model_args: {name} must be >= 1, got {value!r}")
    return out


def _as_bool(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("tunesmith")
class TunesmithLM(TemplateLM):
    """lm_eval model over a tunesmith model.

    pretrained: an HF-format model directory (or hub id), or a PEFT adapter directory (its
    base from adapter_config.json, or `base`); or an already built tunesmith model (then give
    `tokenizer`). batch_size: requests per forward. precision: as `tunesmith eval` (bf16 runs
    fp32 on CPU). max_length: context window (default: the model's max positions).
    """

    def __init__(
        self, pretrained: str | nn.Module, *, tokenizer: Any = None, base: str | None = None,
        batch_size: int | str = 8, device: str = "auto", precision: str = "bf16",
        max_length: int | str | None = None, max_gen_toks: int | str = 256,
        add_bos_token: bool | str | None = None, cuda_graphs: bool | str = True, seed: int = 0,
        max_batch_size: int | None = None, **unknown: Any,
    ) -> None:
        # max_batch_size: lm_eval passes it for batch_size=auto, which is not supported here.
        super().__init__()
        if unknown:
            raise TunesmithError(f"tunesmith model_args: unknown {', '.join(sorted(unknown))} (known: "
                                 "pretrained, base, batch_size, device, precision, max_length, "
                                 "max_gen_toks, add_bos_token, cuda_graphs)")
        if str(batch_size).startswith("auto"):
            raise TunesmithError("tunesmith model_args: batch_size=auto is not supported; give a number")
        self._batch_size = _as_int(batch_size, "batch_size")
        self._max_gen_toks = _as_int(max_gen_toks, "max_gen_toks")
        self.rt, self._model, self.tokenizer = self._load(pretrained, tokenizer, base, device, precision)
        if get_family(self._model.cfg.model_type).kind != "causal":
            raise TunesmithError(f"lm-eval needs a causal LM; {pretrained} is an encoder (masked LM), "
                                 "for which loglikelihood and generation are not defined")
        self._max_length = _as_int(max_length, "max_length") if max_length else usable_positions(self._model.cfg)
        self.add_bos_token = None if add_bos_token is None else _as_bool(add_bos_token)
        self.cuda_graphs = _as_bool(cuda_graphs)
        self.seed = int(seed)
        self.pretrained = pretrained if isinstance(pretrained, str) else type(pretrained).__name__

    @staticmethod
    def _load(pretrained: str | nn.Module, tokenizer: Any, base: str | None, device: str,
              precision: str) -> tuple[Runtime, nn.Module, Any]:
        if device.startswith("cuda:"):  # lm_eval's default spelling
            torch.cuda.set_device(torch.device(device))
            device = "cuda"
        rt = resolve_runtime(device, precision)
        if isinstance(pretrained, nn.Module):
            if tokenizer is None:
                raise TunesmithError("TunesmithLM(model) needs tokenizer=")
            return rt, pretrained.eval(), tokenizer
        model, tok = load_for_inference(str(pretrained), rt, base=base)
        return rt, model, tokenizer or tok

    # -- what lm_eval asks of a model ------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """Stands in for an empty context: BOS, else EOS (as HFLM)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self.rt.device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "")).replace("/", "__")

    def get_model_info(self) -> dict[str, Any]:
        n = sum(p.numel() for p in self._model.parameters())
        return {"model_num_parameters": n, "model_dtype": str(self.rt.compute_dtype),
                "model_family": self._model.cfg.model_type, "precision": self.rt.precision}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:
        """Token ids; the tokenizer's own special tokens unless told otherwise, and none when
        the text already starts with the prefix token (a few-shot prompt written with BOS)."""
        add = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            add = False
        ids = self.tokenizer.encode(string, **({} if add is None else {"add_special_tokens": add}))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int] | int, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # -- scoring ---------------------------------------------------------------------------
    @torch.inference_mode()
    def _continuation_logprobs(self, rows: list[tuple[list[int], int]]) -> list[torch.Tensor]:
        """rows [(input ids, n continuation tokens)] -> per row log-probs [n, V] (fp32) of the
        positions that predict the continuation (the last n inputs' next tokens)."""
        width = max(len(ids) for ids, _ in rows)
        batch = torch.zeros(len(rows), width, dtype=torch.long)  # right-padded [B, T]
        for i, (ids, _) in enumerate(rows):
            batch[i, :len(ids)] = torch.tensor(ids)
        with self.rt.autocast():
            hidden = self._model(batch.to(self.device), return_hidden=True)  # [B, T, D]
            picked = torch.cat([hidden[i, len(ids) - n:len(ids)] for i, (ids, n) in enumerate(rows)])
            logits = self._model.output(picked)  # [sum n, V]: the head on scored positions only
        return list(torch.log_softmax(logits.float(), dim=-1).split([n for _, n in rows]))

    def _window(self, context: list[int], continuation: list[int]) -> tuple[list[int], int]:
        """Model input for one request: the last max_length + 1 tokens, minus the last one."""
        if not context or not continuation or len(continuation) > self.max_length:
            raise TunesmithError(f"lm-eval request with {len(context)} context and {len(continuation)} "
                                 f"continuation tokens cannot be scored (max_length {self.max_length})")
        return (context + continuation)[-(self.max_length + 1):][:-1], len(continuation)

    def _loglikelihood_tokens(self, requests: list[TokenRequest], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
                         group_by="contexts", group_fn=lambda r: r[1] + r[2][:-1])
        results: list[tuple[float, bool]] = []
        for chunk in order.get_batched(n=self.batch_size):
            scored = self._continuation_logprobs([self._window(ctx, cont) for _, ctx, cont in chunk])
            for (strings, ctx, cont), logp in zip(chunk, scored, strict=True):
                greedy = logp.argmax(-1)  # [n]
                for strings_i, cont_i, logp_i in order.get_cache(
                        req_str=strings, cxt_toks=ctx, cont_toks=cont, logits=logp[None]):
                    # Requests sharing context + continuation[:-1] reuse the longest one's
                    # log-probs: their continuation is a suffix of its scored positions.
                    target = torch.tensor(cont_i, device=logp.device)
                    lp = logp_i[0, -len(cont_i):].gather(-1, target[:, None])
                    answer = (float(lp.sum()), bool((greedy[-len(cont_i):] == target).all()))
                    results.append(answer)
                    if strings_i is not None:
                        self.cache_hook.add_partial("loglikelihood", strings_i, answer)
        return order.get_original(results)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood: disjoint windows of max_length tokens, each conditioned
        on the token before it (the first on the prefix token), summed per text."""
        windows: list[TokenRequest] = []
        owner: list[int] = []
        for i, req in enumerate(requests):
            (text,) = req.args
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[i] += logp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ------------------------------------------------------------------------
    def _prompt_ids(self, text: str, budget: int) -> list[int]:
        """A generation prompt's ids: no added BOS when the text starts with it, left-truncated."""
        bos = getattr(self.tokenizer, "bos_token", None)
        add = False if bos and text.startswith(bos) else self.add_bos_token
        ids = self.tokenizer.encode(text, **({} if add is None else {"add_special_tokens": add}))
        return ids[-budget:]

    def _stop_fn(self, until: list[str]):
        """new tokens [B, n] -> bool [B]: a stop string appears in the decoded last tokens
        (each stop's own token count + 2, since a model may spell it in other pieces)."""
        spans = [(s, len(self.tokenizer.encode(s, add_special_tokens=False)) + 2) for s in until if s]

        def done(new: torch.Tensor) -> torch.Tensor:
            rows = new.tolist()
            hit = [any(s in self.tokenizer.decode(r[-k:]) for s, k in spans) for r in rows]
            return torch.tensor(hit, dtype=torch.bool)

        return done

    def _generate_chunk(self, contexts: Sequence[str], gen_kwargs: dict[str, Any]) -> list[str]:
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok_decode(
            self.eot_token_id, skip_special_tokens=False))
        max_new = int(kwargs.pop("max_gen_toks"))
        if max_new >= self.max_length:
            raise TunesmithError(f"lm-eval asks for {max_new} new tokens; the model's context is "
                                 f"{self.max_length} tokens (max_gen_toks must be smaller)")
        if set(kwargs) - _SAMPLING_KEYS:
            log.warning("tunesmith lm-eval model ignores generation kwargs %s",
                        sorted(set(kwargs) - _SAMPLING_KEYS))
        temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
        gen = torch.Generator(device=self.device).manual_seed(self.seed) if temperature > 0 else None
        prompts = [self._prompt_ids(c, self.max_length - max_new) for c in contexts]
        eos = [self.eot_token_id] if self.eot_token_id is not None else []
        pad = self.tokenizer.pad_token_id
        with self.rt.autocast():
            new = generate_batched(
                self._model, prompts, max_new, eos, batch_size=len(prompts), temperature=temperature,
                gen=gen, pad_id=pad if pad is not None else (eos or [0])[0], cuda_graphs=self.cuda_graphs,
                top_k=kwargs.get("top_k"), top_p=kwargs.get("top_p"), stop_fn=self._stop_fn(until))
        return [postprocess_generated_text(self.tok_decode(ids), until, None) for ids in new]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continue each context until a stop string, EOS or max_gen_toks (greedy unless the
        task samples); requests with the same generation kwargs share batches."""
        order = Collator([r.args for r in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                         group_by="gen_kwargs", group_fn=lambda r: r[1])
        results: list[str] = []
        for chunk in order.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk, strict=True)
            for context, kw, text in zip(contexts, all_kwargs,
                                         self._generate_chunk(contexts, all_kwargs[0]), strict=True):
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, kw), text)
        return order.get_original(results)


def lm_eval_main() -> None:
    """`tunesmith-lm-eval`: lm_eval's own command line with model type "tunesmith" known,
    e.g. `tunesmith-lm-eval run --model tunesmith --model_args pretrained=DIR --tasks hellaswag`."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
