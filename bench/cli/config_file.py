"""``bench run --config FILE`` and ``bench sweep --config FILE``: a command's options kept in a YAML (or JSON) file.

The keys are the command's option names (``batch_size`` or ``batch-size``); flags on the command line override the
file. The command's own parser is the schema, so a file and the flags cannot drift apart: each value goes through its
option's type, range and choices, and an unknown key, a wrong type or a value out of range is one line naming the key
and the file. Richer values where a flag is a string:

- ``encoder`` / ``connector`` / ``llm`` (``bench run``): a name, or a mapping ``{name: cls_prune, keep_ratio: 0.25}``
  (the component spec, as a run's ``config.yaml`` writes it); ``--connector-arg`` settings from the command line are
  laid over it;
- ``data``: a kind (``world``, ``llava``, ``hf``) or the run's whole ``data`` mapping;
- ``lora``: ``true`` (LLaVA-1.5's settings), ``false``, ``r=16,alpha=32`` or a mapping;
- ``stages`` (``bench run`` only): the stage list itself (a run's ``config.yaml`` writes its recipe's stages out, so it
  reproduces the run even if the named recipe changes later);
- comma-separated options (the sweep's ``encoder``, ``connector``, ``llm``, ``seeds``; ``report_to``): YAML lists,
  a connector entry as ``cls_prune[keep_ratio=0.5]`` or as a mapping.

Why PyYAML and the parser rather than draccus / jsonargparse / OmegaConf: those generate a command line from a schema
(a dataclass, type hints); here the command line exists, with its range-checked types, and a second schema would be a
second place for every option to be defined. PyYAML reads the file (``safe_load``: no object construction); its
import costs nothing on ``bench list`` (imported only when ``--config`` is given; docs/training.md has the figure).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

#: options that no file may set: what to continue, where the file is, and the trust decisions of this invocation
NOT_IN_FILES = {"config", "resume", "help", "func", "command", "allow_dotted_paths", "no_verify"}
#: keys of a run file that are not options: the run config's own structured fields
RUN_FIELDS = {"stages"}
COMPONENTS = ("encoder", "connector", "llm")
#: options comma-separated on the command line, lists in a file
LIST_OPTIONS = {"sweep": ("encoder", "connector", "llm", "seeds", "report_to"), "run": ("report_to",)}


class ConfigFileError(ValueError):
    """A configuration file that cannot be used: the message names the file and the key."""


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in ``path`` (YAML, or JSON, which is YAML); one line when it is missing, unparsable or not a
    mapping."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigFileError(f"--config {path}: cannot read it ({err.strerror or err})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigFileError(f"{path}: not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(
            f"{path}: a configuration file holds a mapping of option: value, not a {type(data).__name__}"
        )
    return data


def subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:  # noqa: SLF001 (argparse keeps its sub-commands there and nowhere public)
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return action.choices[command]
    raise KeyError(command)


def options(sub: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in sub._actions if a.dest not in NOT_IN_FILES and a.option_strings}  # noqa: SLF001


def given_on_command_line(sub: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options written in ``argv`` (``--x v`` and ``--x=v``)."""
    given = set()
    for action in sub._actions:  # noqa: SLF001
        for opt in action.option_strings:
            if any(tok == opt or tok.startswith(opt + "=") for tok in argv):
                given.add(action.dest)
    return given


def defaults_from_file(sub: argparse.ArgumentParser, command: str, path: str | Path) -> dict[str, Any]:
    """The file's values as the parser's defaults, each checked by its option's own type and choices."""
    data = read_config_file(path)
    known = options(sub)
    out: dict[str, Any] = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest in NOT_IN_FILES:
            raise ConfigFileError(f"{path}: key {key!r} cannot be set in a file (give it on the command line)")
        if command == "run" and dest in RUN_FIELDS:
            out[dest] = _stages(path, key, value)
            continue
        if dest not in known:
            names = ", ".join(
                sorted(d.replace("_", "-") for d in known) + (sorted(RUN_FIELDS) if command == "run" else [])
            )
            raise ConfigFileError(f"{path}: unknown key {key!r} for bench {command}; known: {names}")
        try:
            out[dest] = _value(command, dest, known[dest], value)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
            raise ConfigFileError(f"{path}: {key}: {err}") from None
    return out


def _stages(path, key, value) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(s, dict) for s in value):
        raise ConfigFileError(f"{path}: {key}: a list of stage mappings (stage: 1, steps: ..., lr: ...), not {value!r}")
    return value


def _value(command: str, dest: str, action: argparse.Action, value: Any) -> Any:
    """``value`` as the option would hold it had it been typed; TypeError / ValueError saying why not."""
    if value is None:
        if action.default is None or action.nargs == "?":
            return None
        raise ValueError(f"null is not allowed (the option's default is {action.default!r}; leave the key out)")
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):  # noqa: SLF001
        if not isinstance(value, bool):
            raise TypeError(f"{value!r} is not true or false")
        return value
    if isinstance(action, argparse._AppendAction):  # noqa: SLF001 (--connector-arg: a list, or a mapping of settings)
        if isinstance(value, dict):
            return [f"{k}={json.dumps(v)}" for k, v in value.items()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TypeError(f"{value!r} is not a list of key=value strings or a mapping")
        return value
    if command == "run" and dest in (*COMPONENTS, "data") and isinstance(value, dict):
        if dest != "data" and not isinstance(value.get("name"), str):
            raise ValueError(f"a component mapping needs a name (e.g. {{name: {action.default}}}), got {value!r}")
        return value
    if dest == "tiling" and isinstance(value, dict):  # a run's config.yaml: the whole spec, pinpoints included
        return value
    if dest == "lora":
        if isinstance(value, bool):  # true: LLaVA-1.5's settings (bare --lora); false: none
            return "" if value else None
        if isinstance(value, dict):
            return value
    if dest in LIST_OPTIONS.get(command, ()) and isinstance(value, list):
        value = ",".join(_sweep_entry(v) for v in value)
    if isinstance(value, (dict, list)):
        raise TypeError(f"{value!r} is a {type(value).__name__}; this option takes one value")
    if isinstance(value, bool):
        raise TypeError(f"{value!r} is not a value of this option (true/false only fit on/off options)")
    converted = action.type(str(value)) if action.type is not None else str(value)
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"{value!r} is not one of {', '.join(map(str, action.choices))}")
    return converted


def _sweep_entry(entry: Any) -> str:
    """One list entry of a sweep option as the command line spells it: ``{name: cls_prune, keep_ratio: 0.5}`` ->
    ``cls_prune[keep_ratio=0.5]``."""
    if isinstance(entry, dict):
        if not isinstance(entry.get("name"), str):
            raise ValueError(f"a connector mapping needs a name, got {entry!r}")
        settings = ",".join(f"{k}={json.dumps(v)}" for k, v in entry.items() if k != "name")
        return entry["name"] + (f"[{settings}]" if settings else "")
    if isinstance(entry, (dict, list, bool)):
        raise TypeError(f"list entry {entry!r} is not a name or a number")
    return str(entry)


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; with ``--config FILE``, the file's values become the command's defaults and ``argv`` is parsed
    again over them (flags win). ``args.given`` holds the options written on the command line."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    path = getattr(args, "config", None)
    if not path:
        return args
    sub = subparser(parser, args.command)
    try:
        defaults = defaults_from_file(sub, args.command, path)
    except ConfigFileError as err:
        parser.exit(2, f"bench {args.command}: error: {err}\n")
    sub.set_defaults(**defaults)
    args = parser.parse_args(argv)
    args.given = given_on_command_line(sub, argv)
    args.from_file = set(defaults)
    return args
