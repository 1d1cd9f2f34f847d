"""Range checks for settings, where they are defined.

``check("qformer", "num_queries", value, int, lo=1)`` returns the value or raises :class:`SettingError` with one line
naming the owner, the setting, the value and what is allowed:

    qformer: num_queries=0 is out of range; allowed: an integer >= 1

Used by the connectors' constructors, the training stages and the run config, so the same message reaches a user
whether the value came from ``--connector-arg``, a recipe or a run's ``config.json``; the ``bench`` command's integer
options use :func:`arg_type` so argparse reports the same.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["PILLOW_MAX_IMAGE_PIXELS", "SettingError", "arg_type", "check", "check_choice"]

#: Pillow's decompression-bomb limit, ``PIL.Image.MAX_IMAGE_PIXELS`` (written out so the command line need not import
#: Pillow; a test checks it against the installed Pillow)
PILLOW_MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3


class SettingError(ValueError):
    """A setting's value has the wrong type or lies outside its allowed range."""


_KIND = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    dict: "an object",
    list: "a list",
}


def describe(kind: type, lo: float | None, hi: float | None, lo_open: bool, hi_open: bool, optional: bool) -> str:
    text = _KIND[kind]
    if lo is not None and hi is not None:
        text += f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    elif lo is not None:
        text += f" {'>' if lo_open else '>='} {lo}"
    elif hi is not None:
        text += f" {'<' if hi_open else '<='} {hi}"
    return text + (" or null" if optional else "")


def _is(kind: type, value: Any) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is list:
        return isinstance(value, (list, tuple))
    return isinstance(value, kind)


def check(
    owner: str,
    name: str,
    value: Any,
    kind: type,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    optional: bool = False,
) -> Any:
    """``value`` if it is of ``kind`` and within [lo, hi] (open ends as asked), None when ``optional``."""
    if value is None and optional:
        return None
    allowed = describe(kind, lo, hi, lo_open, hi_open, optional)
    if not _is(kind, value):
        raise SettingError(f"{owner}: {name}={value!r} has the wrong type; allowed: {allowed}")
    if value != value:  # NaN
        raise SettingError(f"{owner}: {name}={value!r} is out of range; allowed: {allowed}")
    below = lo is not None and (value <= lo if lo_open else value < lo)
    above = hi is not None and (value >= hi if hi_open else value > hi)
    if below or above:
        raise SettingError(f"{owner}: {name}={value!r} is out of range; allowed: {allowed}")
    return value


def check_choice(owner: str, name: str, value: Any, choices: Sequence[Any], optional: bool = False) -> Any:
    if (value is None and optional) or value in choices:
        return value
    raise SettingError(
        f"{owner}: {name}={value!r} is not allowed; allowed: one of {', '.join(map(str, choices))}"
        + (" or null" if optional else "")
    )


def arg_type(
    kind: type,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    words: dict[str, Any] | None = None,
) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses and range-checks (``words``: spelled values, e.g. {"all": None})."""
    allowed = describe(kind, lo, hi, lo_open, hi_open, False) + (f", or {' / '.join(words)}" if words else "")

    def parse(text: str) -> Any:
        if words and text in words:
            return words[text]
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {allowed}") from None
        try:
            return check("", "", value, kind, lo, hi, lo_open, hi_open)
        except SettingError:
            raise argparse.ArgumentTypeError(f"{text} is out of range; allowed: {allowed}") from None

    parse.__name__ = _KIND[kind].split()[-1]
    return parse


def parse_value(text: str) -> Any:
    """``--connector-arg keep=0.25`` -> 0.25; JSON where it parses, else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_settings(pairs: list[str] | None) -> dict[str, Any]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"setting {pair!r} must look like key=value (e.g. --connector-arg num_queries=32)")
        out[key.replace("-", "_")] = parse_value(value)
    return out
