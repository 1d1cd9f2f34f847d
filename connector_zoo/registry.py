"""One registry mechanism for the three families (encoders, connectors, LLM backends).

A name resolves, in this order, to:

1. a class registered at run time with ``@REGISTRY.register("name")`` (notebooks, tests, plugins already imported);
2. a built-in of this repository. Built-ins are found by *reading* the family's package with ``ast`` (no import):
   every class decorated ``@register("name")`` is indexed as ``name -> "module:Class"`` and imported only when
   asked for, so ``bench list`` stays fast and the name is written in one place, the decorator;
3. an entry point in the family's group (e.g. ``connector_zoo.connectors``), loaded lazily; a plugin that fails to
   import breaks only itself, with its name and error;
4. a dotted path ``package.module:Class`` with no registration at all. Importing a module runs its code, so a name
   read from a file (a saved run's ``vlm_config.json`` or ``config.json``, perhaps someone else's) may not be a dotted
   path unless the user opts in: inside :func:`names_from_file` only 1-3 resolve.

A duplicate name raises; an unknown name raises with the close matches and the available names.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["Registry", "RegistryError", "Entry"]


class RegistryError(LookupError):
    """A name could not be resolved, or was registered twice, or its plugin is broken."""


_FILE_SOURCE: ContextVar[str | None] = ContextVar("names_from_file", default=None)


@contextmanager
def names_from_file(source: str | object, allow_dotted_paths: bool = False) -> Iterator[None]:
    """Resolve names read from ``source`` (a file): dotted paths are refused unless ``allow_dotted_paths``."""
    token = _FILE_SOURCE.set(None if allow_dotted_paths else str(source))
    try:
        yield
    finally:
        _FILE_SOURCE.reset(token)


@dataclass
class Entry:
    name: str
    target: str  # "module:attr"
    description: str
    origin: str  # "built-in", "plugin (dist x.y)", "runtime (module)"
    pattern: str | None = None
    error: str | None = None


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0].strip() if (doc or "").strip() else ""


def _decorator_name(dec: ast.expr) -> tuple[str, str | None] | None:
    """Return (name, pattern) for ``@register("x")`` / ``@X.register("x", pattern=...)``, else None."""
    if not isinstance(dec, ast.Call) or not dec.args:
        return None
    func = dec.func
    func_name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if func_name != "register" or not isinstance(dec.args[0], ast.Constant) or not isinstance(dec.args[0].value, str):
        return None
    pattern = next(
        (k.value.value for k in dec.keywords if k.arg == "pattern" and isinstance(k.value, ast.Constant)), None
    )
    return dec.args[0].value, pattern


class Registry:
    """Maps names to component classes of one family."""

    def __init__(self, family: str, package: str, entry_point_group: str, base_path: str):
        self.family = family  # "connector", "encoder", "llm"
        self.package = package  # "connectors"
        self.group = entry_point_group
        self.base_path = base_path  # "connectors.base:Connector": dotted-path lookups must subclass it
        self._classes: dict[str, type] = {}
        self._runtime: dict[str, Entry] = {}
        self._builtins: dict[str, Entry] | None = None
        self._plugins: dict[str, Entry] | None = None

    # ----------------------------------------------------------------- indexes
    def builtins(self) -> dict[str, Entry]:
        if self._builtins is None:
            pkg_dir = Path(importlib.util.find_spec(self.package).origin).parent
            index: dict[str, Entry] = {}
            for path in sorted(pkg_dir.glob("*.py")):
                if path.name.startswith("_"):
                    continue
                module = f"{self.package}.{path.stem}"
                for node in ast.parse(path.read_text(encoding="utf-8")).body:
                    if not isinstance(node, ast.ClassDef):
                        continue
                    for dec in node.decorator_list:
                        found = _decorator_name(dec)
                        if found is None:
                            continue
                        name, pattern = found
                        if name in index:
                            raise RegistryError(
                                f"duplicate built-in {self.family} name {name!r}: {index[name].target} and "
                                f"{module}:{node.name}"
                            )
                        doc = _first_line(ast.get_docstring(node))
                        index[name] = Entry(name, f"{module}:{node.name}", doc, "built-in", pattern)
            self._builtins = index
        return self._builtins

    def plugins(self) -> dict[str, Entry]:
        if self._plugins is None:
            found: dict[str, Entry] = {}
            for ep in metadata.entry_points(group=self.group):
                dist = getattr(ep, "dist", None)
                origin = f"plugin ({dist.name} {dist.version})" if dist is not None else "plugin"
                found[ep.name] = Entry(ep.name, ep.value, "", origin)
            self._plugins = found
        return self._plugins

    def refresh(self) -> None:
        """Forget the cached entry-point index (after installing a plugin in the same process)."""
        self._plugins = None

    # ------------------------------------------------------------ registration
    def register(self, name: str, *, pattern: str | None = None):
        """Class decorator: ``@CONNECTORS.register("qformer")``. A duplicate name raises."""

        def deco(cls: type) -> type:
            target = f"{cls.__module__}:{cls.__qualname__}"
            known = self._classes.get(name)
            if known is not None and known is not cls:
                raise RegistryError(
                    f"{self.family} name {name!r} is already registered by {known.__module__}:{known.__qualname__}; "
                    f"cannot register {target} under the same name"
                )
            builtin = self.builtins().get(name)
            if builtin is not None and builtin.target != target:
                raise RegistryError(
                    f"{self.family} name {name!r} is a built-in ({builtin.target}); choose another name"
                )
            self._classes[name] = cls
            cls.registered_name = name
            if builtin is None:
                self._runtime[name] = Entry(
                    name, target, _first_line(cls.__doc__), f"runtime ({cls.__module__})", pattern
                )
            return cls

        return deco

    # ------------------------------------------------------------------ lookup
    def resolve(self, name: str) -> tuple[type, dict[str, Any]]:
        """Name -> (class, kwargs implied by the name, e.g. ``mlp3x_gelu`` -> {"depth": 3})."""
        if name in self._classes:
            return self._classes[name], {}
        builtins = self.builtins()
        if name in builtins:
            return self._import_entry(builtins[name]), {}
        for entry in builtins.values():
            match = re.fullmatch(entry.pattern, name) if entry.pattern else None
            if match:
                kwargs = {k: int(v) if v.isdigit() else v for k, v in match.groupdict().items()}
                return self._import_entry(entry), kwargs
        plugins = self.plugins()
        if name in plugins:
            cls = self._import_entry(plugins[name])
            if isinstance(cls, type) and "registered_name" not in vars(cls):
                cls.registered_name = name  # a subclass of a built-in goes by its own name, not its parent's
            self._classes.setdefault(name, cls)
            return cls, {}
        if ":" in name:
            return self._import_dotted(name), {}
        raise RegistryError(self._unknown_message(name))

    def get(self, name: str) -> type:
        return self.resolve(name)[0]

    def names(self) -> list[str]:
        return sorted({*self.builtins(), *self._runtime, *self.plugins()})

    def entries(self) -> list[Entry]:
        """All known entries with descriptions; loads plugins to read them (a broken one reports its error)."""
        out: dict[str, Entry] = {}
        for name, entry in self.plugins().items():
            try:
                cls = self._import_entry(entry)
                out[name] = Entry(name, entry.target, _first_line(cls.__doc__), entry.origin)
            except RegistryError as err:
                out[name] = Entry(name, entry.target, "", entry.origin, error=str(err))
        out.update(self._runtime)
        out.update(self.builtins())
        return [out[k] for k in sorted(out)]

    # --------------------------------------------------------------- internals
    def _import_entry(self, entry: Entry) -> type:
        module_name, _, attr = entry.target.partition(":")
        try:
            obj = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except Exception as err:  # a broken plugin must break only itself
            raise RegistryError(
                f"{self.family} {entry.name!r} ({entry.origin}, {entry.target}) failed to import: "
                f"{type(err).__name__}: {err}"
            ) from err
        return obj

    def _import_dotted(self, path: str) -> type:
        module_name, _, attr = path.partition(":")
        if not module_name or not attr:
            raise RegistryError(f"{self.family} path {path!r} must look like 'package.module:ClassName'")
        source = _FILE_SOURCE.get()
        if source is not None:
            raise RegistryError(
                f"{source} names the {self.family} {path!r} by dotted path, which would import and run module "
                f"{module_name!r}; names read from a file resolve only to built-in, registered or entry-point "
                f"components. If you trust this file, pass --allow-dotted-paths"
            )
        cls = self._import_entry(Entry(path, path, "", "dotted path"))
        base = self._import_entry(Entry(self.base_path, self.base_path, "", "base class"))
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise RegistryError(f"{path!r} is not a subclass of {self.base_path}; a {self.family} must subclass it")
        return cls

    def _unknown_message(self, name: str) -> str:
        names = self.names()
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        return (
            f"unknown {self.family} {name!r}; {hint}available: {', '.join(names)} "
            f"(or a dotted path 'package.module:ClassName', or an entry point in group {self.group!r})"
        )
