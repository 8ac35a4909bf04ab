"""Field rules for the frozen config dataclasses: a table per class, checked at construction.

Each dataclass names its rules in a table and calls `check_fields(self, TABLE)` from
`__post_init__`. A broken rule raises ValueError("ClassName.field must be <rule>, got <value>");
`load_config` renames the class to the section the user wrote (`TrainConfig.batch_size` ->
`train.batch_size`), so a library user and a config file each see names they know.

Function arguments are checked by `check_positive_int` / `check_non_negative_int` ("<name> must
be a positive integer, got <value>"), where numpy integers count as integers.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Rule:
    what: str  # completes "must be ...", e.g. "a positive integer"
    test: Callable[[Any], bool]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    # OmegaConf hands ints to float fields written without a decimal point ("eps: 1").
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


POSITIVE_INT = Rule("a positive integer", lambda v: _is_int(v) and v > 0)
NON_NEGATIVE_INT = Rule("a non-negative integer", lambda v: _is_int(v) and v >= 0)
POSITIVE = Rule("a finite number > 0", lambda v: _is_number(v) and v > 0)
NON_NEGATIVE = Rule("a finite number >= 0", lambda v: _is_number(v) and v >= 0)
FRACTION = Rule("a number in (0, 1)", lambda v: _is_number(v) and 0 < v < 1)  # a share of data
PROBABILITY = Rule("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1)  # dropout, betas
NON_EMPTY = Rule("a non-empty string", lambda v: isinstance(v, str) and v.strip() != "")


def optional(rule: Rule) -> Rule:
    """The rule, or None (null in YAML)."""
    return Rule(f"{rule.what} or null", lambda v: v is None or rule.test(v))


def one_of(*choices) -> Rule:
    return Rule(f"one of {choices}", lambda v: v in choices)


def check_fields(obj, rules: dict[str, Rule]) -> None:
    """Raise ValueError naming the first field of `obj` that breaks its rule."""
    for name, rule in rules.items():
        value = getattr(obj, name)
        if not rule.test(value):
            raise ValueError(f"{type(obj).__name__}.{name} must be {rule.what}, got {value!r}")


def _is_integral(v) -> bool:  # Python or numpy integers, not bools
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_positive_int(name: str, value: object) -> None:
    """Raise ValueError naming `name` unless `value` is an integer > 0."""
    if not (_is_integral(value) and value > 0):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_non_negative_int(name: str, value: object) -> None:
    """Raise ValueError naming `name` unless `value` is an integer >= 0."""
    if not (_is_integral(value) and value >= 0):
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
