"""The base of every config section (strict keys, validated assignment), in its own module so
that the section modules (schema, observe) share it without importing each other."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Base for every config section: strict keys, validated assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
