"""The base of every config section (strict keys, validated assignment), in its own module so
that the section modules (schema, observe) share it without importing each other."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Base for every config section: strict keys, validated assignment, finite numbers (an
    `inf` or `nan` in a float field is a typo or an overflow, never a setting: `dpo.beta=inf`
    or `train.router_aux_loss_coef=inf` would otherwise pass `gt=0` and end in a NaN loss)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(),
                              allow_inf_nan=False)
