"""Config sections of the non-CLM tasks: `sft:` (instruction / chat / summarization data),
`mlm:` (masked LM), `dpo:` (preference tuning) and `eval.generate:` (evaluation by generation). Kept apart from
`schema.py` so the core schema stays small; `RunConfig` only references them."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, field_validator, model_validator

from tunesmith.config.section import Section as _Section

# The one list of SFT record formats: the config's literal, the CLI's choices, the renderers.
SFTFormat = Literal["alpaca", "dolly", "chat", "sharegpt", "summarization", "custom"]
SFT_FORMATS: tuple[str, ...] = get_args(SFTFormat)


class SFTConfig(_Section):
    format: SFTFormat = Field(
        "alpaca",
        description="Record format: alpaca (instruction/input/output), dolly (instruction/"
        "context/response/category), chat ([{role, content}] in `messages`), sharegpt "
        "([{from, value}] in `conversations`), summarization (dialogue -> summary, SAMSum "
        "names), custom (prompt_template + response_template over any fields).",
    )
    prompt_template: str | None = Field(
        None, description="Python format string over record fields for the prompt, e.g. "
        "'Question: {question}\\nAnswer: '. Replaces the format's default prompt.",
    )
    response_template: str | None = Field(
        None, description="Format string for the trained response (custom format), e.g. "
        "'{answer}'.",
    )
    fields: dict[str, str] = Field(
        default_factory=dict, description="Rename the format's fields, e.g. {output: answer} "
        "reads the alpaca response from `answer`.",
    )
    chat_template: str | None = Field(
        None, description="'tokenizer' (the tokenizer's own Jinja template) or a built-in: "
        "llama3, chatml, alpaca. chat/sharegpt: default 'tokenizer'. alpaca/dolly/"
        "summarization: when set, each record is rendered as a user/assistant chat through "
        "this template instead of the format's own prompt.",
    )
    system_prompt: str | None = Field(None, description="System message added to chats "
                                      "that have none (built-in templates).")
    category: list[str] | None = Field(
        None, description="dolly: keep only these categories (e.g. [open_qa]).",
    )
    train_on_inputs: bool = Field(
        False, description="Also train on prompt tokens; by default only response tokens "
        "(assistant turns for chats) carry labels.",
    )
    overlong: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="Examples longer than data.block_size: truncate (keep the "
        "first block_size tokens), drop, or error. Counts are logged.",
    )
    invalid: Literal["error", "skip"] = Field(
        "error", description="Records with missing/mistyped fields or empty responses: "
        "error (one line naming record and field) or skip (counted).",
    )
    packing: bool = Field(
        False, description="Pack several examples per row (up to data.block_size); attention "
        "and positions stay within each example, so the loss equals unpacked training.",
    )

    @field_validator("category", mode="before")
    @classmethod
    def _one_category(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> SFTConfig:
        if self.format == "custom" and not (self.prompt_template and self.response_template):
            raise ValueError("sft.format=custom needs sft.prompt_template and "
                             "sft.response_template")
        if self.category is not None and not self.category:
            raise ValueError("sft.category must name at least one category")
        return self


class MLMConfig(_Section):
    probability: float = Field(0.15, gt=0, lt=1, description="Share of tokens selected for "
                               "prediction (special tokens never are).")
    mask_fraction: float = Field(0.8, ge=0, le=1, description="Selected tokens replaced by "
                                 "the mask token.")
    random_fraction: float = Field(0.1, ge=0, le=1, description="Selected tokens replaced by "
                                   "a random token; the rest stay unchanged.")
    whole_word: bool = Field(False, description="Select whole words (all their sub-tokens) "
                             "instead of single tokens.")

    @model_validator(mode="after")
    def _check(self) -> MLMConfig:
        if self.mask_fraction + self.random_fraction > 1:
            raise ValueError("mlm.mask_fraction + mlm.random_fraction must be <= 1")
        return self


_DEFAULT_GAMMA = 0.5  # SimPO's default target margin (TRL's simpo_gamma)


class DPOConfig(_Section):
    """Preference tuning (task=dpo): records of prompt / chosen / rejected, rendered through the
    `sft:` section (format fields, chat template, overlong and invalid policies)."""

    loss: Literal["sigmoid", "ipo", "simpo", "orpo"] = Field(
        "sigmoid", description="sigmoid: DPO (Rafailov et al. 2023); ipo: IPO's squared loss "
        "(Azar et al. 2023) on length-averaged log-ratios; simpo: SimPO (Meng et al. 2024), "
        "reference-free, length-averaged log-probabilities and a target margin; orpo: ORPO (Hong "
        "et al. 2024), reference-free, the chosen answer's per-token NLL plus beta times the "
        "odds-ratio loss (beta is ORPO's lambda; 0.1 as TRL).",
    )
    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL penalty (DPO, IPO: "
                        "0.1 is common; SimPO's paper uses 2.0-2.5).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="sigmoid only: conservative "
                                   "DPO, the probability that a pair's label is flipped.")
    simpo_gamma: float = Field(_DEFAULT_GAMMA, ge=0, description="simpo only (another value is "
                               "refused with the other losses): the target reward margin gamma of "
                               "-log sigmoid(beta * (avg logp_chosen - avg logp_rejected) - gamma).")
    precompute_reference: bool = Field(
        False, description="Score every training and validation pair with the reference policy "
        "once, before the first step, and keep only those log-probs (TRL's "
        "precompute_ref_log_probs): no reference forward per step, and a full fine-tune frees its "
        "reference copy. Recomputed at every start, resume included.")

    @model_validator(mode="after")
    def _check(self) -> DPOConfig:
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError(f"dpo.label_smoothing applies to dpo.loss=sigmoid, not {self.loss}")
        if self.simpo_gamma != _DEFAULT_GAMMA and self.loss != "simpo":
            raise ValueError(f"dpo.simpo_gamma applies to dpo.loss=simpo, not {self.loss}")
        if self.precompute_reference and not self.uses_reference:
            raise ValueError(f"dpo.precompute_reference: dpo.loss={self.loss} has no reference policy")
        return self

    def changed(self) -> list[str]:
        """`dpo.KEY=value` for each field that differs from its default (a dumped config sets
        every field, so what was set is told by value, not by `model_fields_set`)."""
        return [f"dpo.{k}={getattr(self, k)}" for k, f in type(self).model_fields.items()
                if getattr(self, k) != f.default]

    @property
    def uses_reference(self) -> bool:
        """Whether the loss compares with a reference policy (SimPO and ORPO do not)."""
        return self.loss not in ("simpo", "orpo")


class GenerateEvalConfig(_Section):
    enabled: bool = Field(False, description="After training, generate answers for the "
                          "held-out SFT split and report ROUGE-1/2/L and exact match.")
    max_new_tokens: int = Field(128, gt=0)
    max_samples: int | None = Field(None, gt=0, description="Evaluate at most this many.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy.")
    batch_size: int = Field(16, gt=0, description="Prompts generated together (left-padded, "
                            "longest first); greedy answers do not depend on it.")
    cuda_graphs: bool = Field(True, description="On CUDA, replay each decode step as a captured "
                              "CUDA graph (HF's --use_hpu_graphs_for_inference); false: eager.")
    output: str = Field("predictions.jsonl", description="Predictions file, relative to "
                        "output.dir.")
