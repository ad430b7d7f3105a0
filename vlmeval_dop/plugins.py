"""Loading users' method modules: `--plugins mymodule[,path/to/other.py]` and the entry-point group.

A plugin is any Python module whose import registers methods with `@vlmeval_dop.methods.register_method`
(docs/adding_a_baseline.md). `run.py`, `vlmeval-dop` (list, search, solve, fitprune) and `reproduce/run.py`
take `--plugins`; installed packages can instead declare

    [project.entry-points."vlmeval_dop.methods"]
    mine = "my_package.my_methods"

and are imported on first use of the method registry. No vlmeval import here.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterable
from pathlib import Path

PLUGINS_HELP = ("comma-separated modules (importable names or .py file paths) that register methods with "
                "@vlmeval_dop.methods.register_method (docs/adding_a_baseline.md)")


class PluginError(ImportError):
    """A plugin module that could not be imported; the message names it and the cause."""


_LOADED: dict[str, str] = {}  # plugin as given (module name, or resolved file path) -> module name


def split_plugins(value: str | Iterable[str] | None) -> list[str]:
    """`"a,b"` or `["a,b", "c"]` -> `["a", "b", "c"]` (empty items dropped)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [p.strip() for item in items for p in item.split(",") if p.strip()]


def load_plugins(modules: Iterable[str] | str | None) -> list[str]:
    """Import each plugin module (a module name, or the path of a .py file) so its methods register.

    Idempotent: a module already loaded is not imported again. Returns the module names. PluginError
    names the module when it cannot be found or its import fails (the cause is chained).
    """
    from . import methods

    methods.discover()  # built-ins first: a plugin reusing a built-in name is refused, not the built-in
    names = []
    for plugin in split_plugins(modules):
        path = Path(plugin).expanduser()
        is_file = plugin.endswith(".py") or path.is_file()
        key = str(path.resolve()) if is_file else plugin
        if key in _LOADED:
            names.append(_LOADED[key])
            continue
        methods._SOURCE["current"] = f"plugin {plugin}"
        try:
            name = _import_file(path) if is_file else _import_module(plugin)
        finally:
            methods._SOURCE.pop("current", None)
        _LOADED[key] = name
        names.append(name)
    return names


def _import_module(name: str) -> str:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise PluginError(
                f"plugin module {name!r} not found: put its folder on PYTHONPATH, install it, or give the path of "
                "its .py file (--plugins path/to/module.py)") from exc
        raise PluginError(f"plugin module {name!r} failed to import: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # the user's module raised: say which one, keep the traceback chained
        raise PluginError(f"plugin module {name!r} failed to import: {type(exc).__name__}: {exc}") from exc
    return name


def _import_file(path: Path) -> str:
    if not path.is_file():
        raise PluginError(f"plugin file {str(path)!r} does not exist")
    name = path.stem
    existing = sys.modules.get(name)
    if existing is not None:
        if Path(getattr(existing, "__file__", "") or "").resolve() == path.resolve():
            return name  # imported already (e.g. by module name)
        raise PluginError(f"plugin file {str(path)!r}: a different module named {name!r} is already imported "
                          f"({getattr(existing, '__file__', None)}); rename the file")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # registered before running it, as an import would (dataclasses, pickling)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise PluginError(f"plugin file {str(path)!r} failed to import: {type(exc).__name__}: {exc}") from exc
    return name


def load_entry_points() -> list[str]:
    """Import the modules of the `vlmeval_dop.methods` entry points of installed packages (once each)."""
    from importlib.metadata import entry_points

    from . import methods

    names = []
    for ep in entry_points(group=methods.ENTRY_POINT_GROUP):
        key = f"entry point {ep.name} = {ep.value}"
        if key in _LOADED:
            continue
        methods._SOURCE["current"] = key
        try:
            ep.load()
        except Exception as exc:
            raise PluginError(f"{key} (group {methods.ENTRY_POINT_GROUP}) failed to import: "
                              f"{type(exc).__name__}: {exc}") from exc
        finally:
            methods._SOURCE.pop("current", None)
        _LOADED[key] = ep.module
        names.append(ep.module)
    return names


def add_plugins_argument(parser) -> None:
    """The `--plugins` option of our command lines (argparse)."""
    parser.add_argument("--plugins", action="append", default=None, metavar="MODULES", help=PLUGINS_HELP)


__all__ = ["PLUGINS_HELP", "PluginError", "add_plugins_argument", "load_entry_points", "load_plugins", "split_plugins"]
