"""Typed reading of configuration values: a YAML value becomes its dataclass field's declared type.

A run config is read from YAML files and ``--set key=value`` strings, so every value arrives as
whatever YAML made of it (``abc`` is a string, ``1e-3`` too under YAML 1.1, ``[1, 2]`` a list).
:func:`coerce` turns it into the field's declared type (``int``, ``float``, ``bool``, ``str``, an
enum, a fixed-length tuple, a ``dict`` of scalars, each optionally ``| None``) or raises
:class:`FieldError` with one line naming the key and the expected type; :class:`Limit` adds the range
a field's value must lie in.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from typing import Any, Callable


class FieldError(ValueError):
  """A value that does not fit its field: the message names the key and what was expected."""


@dataclasses.dataclass(frozen=True)
class Limit:
  """What a field's value must satisfy beyond its type (e.g. a positive step count).

  Attributes:
    description: the condition as the error message states it ("> 0", "in [0, 1)").
    holds: the check; None values (a field that is not set) are never checked.
  """

  description: str
  holds: Callable[[Any], bool]


POSITIVE = Limit("> 0", lambda v: v > 0)
NON_NEGATIVE = Limit(">= 0", lambda v: v >= 0)
# Adam's betas and the EMA decay: a decay factor below one.
DECAY = Limit("in [0, 1)", lambda v: 0 <= v < 1)
FRACTION = Limit("in [0, 1]", lambda v: 0 <= v <= 1)


def one_of(choices: typing.Sequence[str]) -> Limit:
  return Limit(f"one of {list(choices)}", lambda v: v in choices)


def field_types(cls) -> dict[str, Any]:
  """Field name -> resolved type annotation of a dataclass (string annotations evaluated)."""
  hints = typing.get_type_hints(cls)
  return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def describe(annotation) -> str:
  """What a value of this type looks like, in the words of an error message."""
  args = typing.get_args(annotation)
  if _is_optional(annotation):
    (inner,) = [a for a in args if a is not type(None)]
    return f"{describe(inner)} or null"
  if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
    return f"one of {[m.value for m in annotation]}"
  if typing.get_origin(annotation) is tuple:
    return f"a list of {len(args)} {_plural(args[0])}"
  if typing.get_origin(annotation) is dict:
    return f"a mapping of {_plural(args[0])} to {_plural(args[1])}"
  return _SCALARS[annotation][0]


def coerce(key: str, value: Any, annotation, *, source: str, limit: Limit | None = None) -> Any:
  """``value`` as the type ``annotation`` declares, within ``limit``.

  Args:
    key: the dotted key (``train.steps``) the message names.
    value: as parsed from YAML.
    annotation: the field's resolved type (see :func:`field_types`).
    source: where the value came from (a file, an override), the message's prefix.
    limit: an extra condition on the (converted) value.

  Raises:
    FieldError: ``{source}: {key} must be {expected}, got {value!r}``.
  """
  try:
    value = _convert(value, annotation)
  except (TypeError, ValueError):
    raise FieldError(f"{source}: {key} must be {describe(annotation)}, got {value!r}") from None
  if limit is not None and value is not None and not limit.holds(value):
    raise FieldError(f"{source}: {key} must be {limit.description}, got {value!r}")
  return value


def _convert(value: Any, annotation) -> Any:
  if _is_optional(annotation):
    if value is None:
      return None
    (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
  if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
    return value if isinstance(value, annotation) else annotation(value)
  if typing.get_origin(annotation) is tuple:
    element_types = typing.get_args(annotation)
    if not isinstance(value, (list, tuple)) or len(value) != len(element_types):
      raise TypeError(value)
    return tuple(_convert(v, t) for v, t in zip(value, element_types))
  if typing.get_origin(annotation) is dict:
    key_type, value_type = typing.get_args(annotation)
    if not isinstance(value, dict):
      raise TypeError(value)
    return {_convert(k, key_type): _convert(v, value_type) for k, v in value.items()}
  return _SCALARS[annotation][1](value)


def _to_int(value) -> int:
  if isinstance(value, bool):
    raise TypeError(value)
  if isinstance(value, int):
    return value
  # YAML 1.1 reads 1e5 as a string and 1.0e5 as a float: whole numbers either way.
  number = float(value) if isinstance(value, (str, float)) else math.nan
  if not number.is_integer():
    raise ValueError(value)
  return int(number)


def _to_float(value) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, str)):
    raise TypeError(value)
  return float(value)  # a str: YAML 1.1 reads "1e-3" as a string


def _exactly(kind: type) -> Callable[[Any], Any]:
  def check(value):
    if not isinstance(value, kind):
      raise TypeError(value)
    return value

  return check


_SCALARS = {
    int: ("an integer", _to_int),
    float: ("a number", _to_float),
    bool: ("true or false", _exactly(bool)),
    str: ("a string", _exactly(str)),
}


def _plural(annotation) -> str:
  return {int: "integers", float: "numbers", bool: "booleans", str: "strings"}[annotation]


def _is_optional(annotation) -> bool:
  return (typing.get_origin(annotation) in (typing.Union, types.UnionType)
          and type(None) in typing.get_args(annotation))
