"""The structure of the files jaxdist reads back, checked before anything uses them.

A file that parses as JSON can still hold the wrong thing (a list, a key missing, a step
that is a string). `check(value, shape, what)` compares a parsed value with a small
description of its shape and refuses a mismatch with one line naming the file and the
place inside it. A shape is:

- a type: `int` (not a bool), `float` (an int or a float, not a bool), `str`, `bool`,
  `dict`, `list`, or `None`;
- a tuple of shapes: any one of them;
- a dict `{key: shape}`: an object holding at least those keys (more are allowed);
- `Each(shape)`: an object whose every value has that shape;
- `ListOf(shape)`: a list whose every item has that shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxdist.base.errors import UserError


@dataclass(frozen=True)
class Each:
    """An object (JSON dict) whose every value has `shape`."""

    shape: Any


@dataclass(frozen=True)
class ListOf:
    """A list whose every item has `shape`."""

    shape: Any


class ShapeError(ValueError):
    """A value that does not have the shape asked for (`where` says which part)."""

    def __init__(self, where: str, wanted: str, found: Any):
        self.where, self.wanted, self.found = where, wanted, found
        super().__init__(f"{where or 'the top level'} should be {wanted}, not "
                         f"{describe_value(found)}")


def describe_value(value: Any) -> str:
    """A few words for what a JSON value is (`a list`, `the string 'abc'`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        shown = value if len(value) <= 20 else value[:17] + "..."
        return f"the string {shown!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def describe_shape(shape: Any) -> str:
    """A few words for what `shape` accepts."""
    if isinstance(shape, tuple):
        return " or ".join(describe_shape(s) for s in shape)
    if shape is None:
        return "null"
    if isinstance(shape, (dict, Each)) or shape is dict:
        return "an object"
    if isinstance(shape, ListOf) or shape is list:
        return "a list"
    return {int: "an integer", float: "a number", str: "a string",
            bool: "true or false"}.get(shape, str(shape))


def _matches(value: Any, shape: Any, where: str) -> None:
    if isinstance(shape, tuple):
        errors = []
        for option in shape:
            try:
                _matches(value, option, where)
                return
            except ShapeError as error:
                errors.append(error)
        # The deepest mismatch says most (e.g. a wrong key inside the object it should be).
        deepest = max(errors, key=lambda e: len(e.where))
        if deepest.where != where:
            raise deepest
        raise ShapeError(where, describe_shape(shape), value)
    if shape is None:
        ok = value is None
    elif shape is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif shape is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif shape in (str, bool, list, dict):
        ok = isinstance(value, shape)
    elif isinstance(shape, dict):
        if not isinstance(value, dict):
            raise ShapeError(where, "an object", value)
        for key, inner in shape.items():
            inside = f"{where}.{key}" if where else key
            if key not in value:
                raise ShapeError(inside, describe_shape(inner), _MISSING)
            _matches(value[key], inner, inside)
        return
    elif isinstance(shape, Each):
        if not isinstance(value, dict):
            raise ShapeError(where, "an object", value)
        for key, inner in value.items():
            _matches(inner, shape.shape, f"{where}.{key}" if where else str(key))
        return
    elif isinstance(shape, ListOf):
        if not isinstance(value, list):
            raise ShapeError(where, "a list", value)
        for index, inner in enumerate(value):
            _matches(inner, shape.shape, f"{where}[{index}]")
        return
    else:
        raise TypeError(f"not a shape: {shape!r}")
    if not ok:
        raise ShapeError(where, describe_shape(shape), value)


class _Missing:
    def __repr__(self) -> str:
        return "missing"


_MISSING = _Missing()


def check(value: Any, shape: Any, what: str, fix: str) -> Any:
    """Return `value` if it has `shape`; else refuse in one line naming `what` and `fix`."""
    try:
        _matches(value, shape, "")
    except ShapeError as error:
        found = "missing" if error.found is _MISSING else describe_value(error.found)
        place = f"its {error.where}" if error.where else "it"
        raise UserError(f"{what} is damaged: {place} should be {error.wanted}, not {found}; "
                        f"{fix}") from None
    return value


def load_json(path: Path, shape: Any, fix: str, what: str | None = None) -> Any:
    """Read the JSON file `path` and `check` it; any failure to read is one line too."""
    what = what or str(path)
    return check(parse_json(read_text(path, fix, what), what, fix), shape, what, fix)


def read_text(path: Path, fix: str, what: str | None = None) -> str:
    """The text of `path`; a folder, a missing, unreadable or non-UTF-8 file is one line."""
    what = what or str(path)
    try:
        return Path(path).read_bytes().decode("utf-8")
    except IsADirectoryError:
        raise UserError(f"{what} is a folder, not a file; {fix}") from None
    except FileNotFoundError:
        raise UserError(f"{what} is missing; {fix}") from None
    except OSError as error:
        raise UserError(f"{what} cannot be read ({error.strerror}); {fix}") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} is not text (not UTF-8), so not what jaxdist wrote; "
                        f"{fix}") from None


def parse_json(text: str, what: str, fix: str) -> Any:
    """`json.loads(text)`, with invalid or absurdly nested JSON refused in one line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{what} is not valid JSON ({error.msg} at line {error.lineno}); "
                        f"{fix}") from None
    except RecursionError:
        raise UserError(f"{what} is nested too deeply to be what jaxdist wrote; {fix}") from None
