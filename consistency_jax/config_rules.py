"""Declarative rules for config fields: types, ranges, choices and orderings, checked before anything runs.

Every field of every config has a rule. The framework's own sections
(experiment.GENERAL_RULES), each network (models.model_rules) and each method
(`Method.config_rules()`) keep a table {field: rule}; `check_fields` applies a
table to one section and raises ConfigError naming `config.<section>.<field>`,
the value and what is valid:

    config.parametrization.sigma_max=0.001 is invalid: must be a finite number > config.parametrization.sigma_min (0.002).

A bound may name another field ('parametrization.sigma_min'), which is how
orderings are written. `invalid_examples` lists values a rule must reject; the
test suite sets each of them in every registered method's and model's config
and checks that validation refuses it, and that no field is left without a rule.
"""

import abc
import dataclasses
import math
from typing import Any, Callable, Sequence

import ml_collections

from consistency_jax.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value is invalid; the message names it and the valid values."""


Bound = float | int | str | None  # a number, or the dotted path of another field ('parametrization.sigma_min')


def field_value(config: ml_collections.ConfigDict, path: str) -> Any:
    value = config
    for part in path.split("."):
        value = value[part]
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Rule(abc.ABC):
    """What values a field may take; `problem` returns None or the description of the valid values."""

    @abc.abstractmethod
    def problem(self, value: Any, config: ml_collections.ConfigDict) -> str | None:
        """None for a valid value, else what the valid values are."""

    def invalid_examples(self, value: Any, config: ml_collections.ConfigDict) -> list[Any]:
        """Values of the field's type that this rule rejects (given the rest of `config`)."""
        return []


@dataclasses.dataclass(frozen=True)
class Number(Rule):
    """A finite int or float within bounds; `special` values are also valid, with their meaning."""

    integer: bool = False
    gt: Bound = None
    ge: Bound = None
    lt: Bound = None
    le: Bound = None
    special: dict = dataclasses.field(default_factory=dict)  # e.g. {-1: "training.num_steps"}
    allow_inf: bool = False  # +inf allowed (e.g. EDM's s_tmax)
    why: str = ""  # appended to the message, e.g. what 0 would do

    def _bounds(self, config) -> list[tuple[str, float, str]]:
        found = []
        for op, bound in (("gt", self.gt), ("ge", self.ge), ("lt", self.lt), ("le", self.le)):
            if bound is None:
                continue
            if isinstance(bound, str):
                found.append((op, field_value(config, bound), f"config.{bound} ({field_value(config, bound)})"))
            else:
                found.append((op, bound, str(bound)))
        return found

    def describe(self, config) -> str:
        symbols = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
        kind = "an integer" if self.integer else ("a number" if self.allow_inf else "a finite number")
        parts = [kind] + [f"{symbols[op]} {text}" for op, _, text in self._bounds(config)]
        text = " ".join(parts[:2]) + "".join(f" and {p}" for p in parts[2:])
        if self.special:
            text += "".join(f", or {k} ({meaning})" for k, meaning in self.special.items())
        return text + (f" ({self.why})" if self.why else "")

    def problem(self, value, config):
        if _is_number(value) and value in self.special and not (isinstance(value, float) and math.isnan(value)):
            return None
        ok = _is_number(value) and (not self.integer or isinstance(value, int))
        ok = ok and not math.isnan(value) and (math.isfinite(value) or (self.allow_inf and value > 0))
        if ok:
            for op, bound, _ in self._bounds(config):
                ok = ok and {"gt": value > bound, "ge": value >= bound, "lt": value < bound,
                             "le": value <= bound}[op]
        return None if ok else f"must be {self.describe(config)}"

    def invalid_examples(self, value, config):
        examples = []
        for op, bound, _ in self._bounds(config):
            step = 1 if self.integer else max(abs(bound) * 1e-3, 1e-6)
            examples.append({"gt": bound, "ge": bound - step, "lt": bound, "le": bound + step}[op])
        if not self.integer:
            examples += [float("nan"), float("-inf")] + ([] if self.allow_inf else [float("inf")])
            examples = [float(x) for x in examples]
        else:
            examples = [int(x) for x in examples]
        return [x for x in examples if x not in self.special and self.problem(x, config) is not None]


def Int(**kwargs) -> Number:  # noqa: N802 -- reads like a type in the rule tables
    return Number(integer=True, **kwargs)


def Float(**kwargs) -> Number:  # noqa: N802
    return Number(integer=False, **kwargs)


@dataclasses.dataclass(frozen=True)
class Choice(Rule):
    """One of a fixed list of values (or of what a registry function returns)."""

    values: Sequence[Any] | Callable[[], Sequence[Any]]
    why: str = ""  # appended to the message, e.g. why a well-known value is not among them

    def _values(self):
        return tuple(self.values() if callable(self.values) else self.values)

    def problem(self, value, config):
        values = self._values()
        return None if value in values and type(value) is type(values[0]) else \
            f"must be one of {', '.join(repr(v) for v in values)}" + (f" ({self.why})" if self.why else "")

    def invalid_examples(self, value, config):
        return ["no-such-choice"] if isinstance(value, str) else []


@dataclasses.dataclass(frozen=True)
class Flag(Rule):
    """True or False."""

    def problem(self, value, config):
        return None if isinstance(value, bool) else "must be True or False"


@dataclasses.dataclass(frozen=True)
class Text(Rule):
    """A non-empty string (a path, a name checked later where it is used), or None when optional."""

    optional: bool = True

    def problem(self, value, config):
        if value is None and self.optional:
            return None
        if isinstance(value, str) and value.strip():
            return None
        return "must be a non-empty string" + (" or None" if self.optional else "")

    def invalid_examples(self, value, config):
        return [""] if isinstance(value, str) or value is None else []


@dataclasses.dataclass(frozen=True)
class Numbers(Rule):
    """A tuple of numbers, each valid under `element`, with a length range and an optional order."""

    element: Number
    min_len: int = 0
    max_len: int | None = None
    order: str | None = None  # 'descending' or 'ascending' (strictly)
    unique: bool = False
    why: str = ""

    def describe(self, config) -> str:
        length = f"at least {self.min_len} " if self.min_len else ""
        if self.max_len is not None:
            length = f"{self.min_len} to {self.max_len} " if self.min_len != self.max_len else f"{self.min_len} "
        text = f"a tuple of {length}values, each {self.element.describe(config)}"
        if self.order:
            text += f", strictly {self.order}"
        if self.unique:
            text += ", without repeats"
        return text + (f" ({self.why})" if self.why else "")

    def problem(self, value, config):
        ok = isinstance(value, (tuple, list)) and len(value) >= self.min_len and (
            self.max_len is None or len(value) <= self.max_len)
        ok = ok and all(self.element.problem(v, config) is None for v in value)
        if ok and self.order and len(value) > 1:
            pairs = list(zip(value[:-1], value[1:]))
            ok = all(a > b for a, b in pairs) if self.order == "descending" else all(a < b for a, b in pairs)
        if ok and self.unique:
            ok = len(set(value)) == len(value)
        return None if ok else f"must be {self.describe(config)}"

    def invalid_examples(self, value, config):
        examples = [(bad,) * max(self.min_len, 1) for bad in self.element.invalid_examples(None, config)[:2]]
        if self.min_len:
            examples.append(())
        return [tuple(x) for x in examples if self.problem(tuple(x), config) is not None]


@dataclasses.dataclass(frozen=True)
class CheckedElsewhere(Rule):
    """A field whose value a registry or loader checks with its own message (names of methods, datasets)."""

    where: str

    def problem(self, value, config):
        return None


def check_fields(config: ml_collections.ConfigDict, section: str, rules: dict[str, Rule]) -> None:
    """Applies `rules` to config.<section>; raises ConfigError on the first invalid or unruled field."""
    for name, rule in rules.items():
        path = f"{section}.{name}" if section else name
        if not has_field(config, path):
            continue
        value = field_value(config, path)
        problem = rule.problem(value, config)
        if problem is not None:
            raise ConfigError(f"config.{path}={value!r} is invalid: {problem}.")


def has_field(config: ml_collections.ConfigDict, path: str) -> bool:
    """Whether config.<path> exists; a rule's name may be dotted ('discriminator.channels': a sub-section's field)."""
    node = config
    for part in path.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False
        node = node[part]
    return True


def fields_without_rules(config: ml_collections.ConfigDict, section: str, rules: dict[str, Rule]) -> list[str]:
    """The fields of config.<section> that no rule covers (sub-sections excluded)."""
    fields = field_value(config, section) if section else config
    return sorted(name for name, value in fields.items()
                  if name not in rules and not isinstance(value, ml_collections.ConfigDict))
