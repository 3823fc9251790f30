"""The base of every config model: unknown keys refused, numbers finite, no booleans for numbers.

pydantic's lax mode takes `true` for the integer 1 and `.inf` or `.nan` for a float; in a
config both are a typing slip (`lora.r: true`, `temperature: .inf`), never a setting, so they
are refused with the field's name like any other invalid value."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def _numeric(annotation: Any) -> bool:
    """True for int or float, alone or in a union that does not also take a boolean."""
    if annotation in (int, float):
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        return bool not in args and any(_numeric(a) for a in args)
    return False


class Checked(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name is not None:
            field = cls.model_fields.get(info.field_name)
            if field is not None and _numeric(field.annotation):
                raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
        return value
