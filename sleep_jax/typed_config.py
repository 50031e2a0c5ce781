"""Turning a ConfigDict section into a frozen, validated dataclass at a library boundary."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def dataclass_from_section(cls: type[T], section: Mapping[str, Any] | T, name: str) -> T:
  """Builds `cls` from `config.<name>` (a ConfigDict or mapping); unknown keys are an error.

  Args:
    cls: a dataclass type whose `__post_init__` validates the values.
    section: the config section, or an instance of `cls` (returned unchanged).
    name: the section name, for error messages ("model", "sleep").

  Returns:
    The dataclass instance.
  """
  if isinstance(section, cls):
    return section
  values = dict(section.items())
  known = {f.name for f in dataclasses.fields(cls)}
  extra = sorted(set(values) - known)
  if extra:
    raise ValueError(f"unknown {name} config fields {extra}; known fields: {sorted(known)}")
  return cls(**values)
