"""Loading plugins: built-in tiers and third-party ones come through the same door.

Every plugin is found through the ``memplug`` entry-point group. An entry point
names a class (instantiated once per Memory) or an object. ``MEMPLUG_PLUGINS``
restricts what loads: ``context,pgvector`` loads only those; ``-kv`` loads all
but ``kv``; an empty value loads none (only plugins passed in code).

``MEMPLUG_TRACE`` traces every hook call of every plugin with its time, on the
``memplug.trace`` logger: ``1`` (or ``stderr``) prints the lines to standard
error, a path appends them to that file.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError

GROUP = "memplug"
trace_log = logging.getLogger("memplug.trace")


def _trace_target() -> str | None:
    value = os.environ.get("MEMPLUG_TRACE", "").strip()
    return None if value.lower() in ("", "0", "false", "no") else value


def _start_tracing(target: str) -> None:
    """Send ``memplug.trace`` lines to stderr or a file (once per process)."""
    if trace_log.handlers:
        return
    to_stderr = target.lower() in ("1", "true", "yes", "stderr")
    handler = logging.StreamHandler(sys.stderr) if to_stderr else logging.FileHandler(target)
    handler.setFormatter(logging.Formatter("%(asctime)s memplug trace %(message)s"))
    trace_log.addHandler(handler)
    trace_log.setLevel(logging.DEBUG)
    trace_log.propagate = False


def _timed(plugin: str, hook: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        started = time.perf_counter()
        outcome = "ok"
        try:
            return fn(*args)
        except BaseException as e:
            outcome = f"raised {type(e).__name__}"
            raise
        finally:
            trace_log.debug("%s %s %.2f ms %s", hook, plugin, 1000 * (time.perf_counter() - started), outcome)
    return call


@dataclass(frozen=True)
class PluginInfo:
    """What ``memplug plugins`` shows for one plugin."""

    name: str
    hooks: tuple[str, ...]
    version: str | None
    level: int | None
    source: str


def parse_selection(spec: str | None) -> tuple[set[str] | None, set[str]]:
    """``(allowed or None for all, blocked)`` from a MEMPLUG_PLUGINS value."""
    if spec is None:
        return None, set()
    names = [n.strip() for n in spec.split(",") if n.strip()]
    blocked = {n[1:] for n in names if n.startswith("-")}
    allowed = {n for n in names if not n.startswith("-")}
    if blocked and not allowed:
        return None, blocked
    return allowed, blocked


def check_tier(plugin: object, name: str) -> None:
    """A tier (a plugin with a ``level``) must have an int level >= 0 and a name."""
    level = getattr(plugin, "level", None)
    if level is None:
        return
    if isinstance(level, bool) or not isinstance(level, int) or level < 0:
        raise PluginError(f"plugin {name!r}: level must be an int >= 0, got {level!r}")
    if not isinstance(getattr(plugin, "name", None), str):
        raise PluginError(f"plugin {name!r}: a tier needs a str 'name' attribute")


class PluginRegistry:
    """A pluggy PluginManager for one Memory, plus what was loaded from where."""

    def __init__(self, selection: str | None, extra: Iterable[object] = (), load_entrypoints: bool = True):
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self._info: dict[str, tuple[str | None, str]] = {}
        allowed, blocked = parse_selection(selection)
        if load_entrypoints:
            self._load_entrypoints(allowed, blocked)
        for plugin in extra:
            self.register(plugin)

    def _load_entrypoints(self, allowed: set[str] | None, blocked: set[str]) -> None:
        eps = {ep.name: ep for ep in entry_points(group=GROUP)}
        unknown = ((allowed or set()) | blocked) - set(eps)
        if unknown:
            raise PluginError(
                f"MEMPLUG_PLUGINS names unknown plugin(s): {', '.join(sorted(unknown))}; "
                f"installed: {', '.join(sorted(eps)) or 'none'}"
            )
        for name, ep in sorted(eps.items()):
            if (allowed is not None and name not in allowed) or name in blocked:
                continue
            try:
                obj = ep.load()
                plugin = obj() if isinstance(obj, type) else obj
            except Exception as e:
                raise PluginError(f"plugin {name!r} ({ep.value}) failed to load: {e}") from e
            version = ep.dist.version if ep.dist is not None else None
            self.register(plugin, name=name, version=version, source=f"entry point {ep.value}")

    def register(self, plugin: object, name: str | None = None, version: str | None = None,
                 source: str = "registered in code") -> str:
        name = name or getattr(plugin, "name", None) or None
        if name is None:
            name = self.pm.get_canonical_name(plugin)
        if self.pm.has_plugin(name):
            raise PluginError(f"a plugin named {name!r} is already registered")
        check_tier(plugin, name)
        try:
            self.pm.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as e:
            raise PluginError(f"plugin {name!r} is invalid: {e}") from e
        try:
            self.pm.check_pending()  # a misspelt hook name would otherwise never be called
        except pluggy.PluginValidationError as e:
            self.pm.unregister(plugin)
            raise PluginError(f"plugin {name!r} implements a hook that does not exist: {e}") from e
        self._info[name] = (version, source)
        target = _trace_target()
        if target is not None:
            _start_tracing(target)
            for caller in self.pm.get_hookcallers(plugin) or ():
                for impl in caller.get_hookimpls():
                    if impl.plugin is plugin and not getattr(impl.function, "_memplug_traced", False):
                        impl.function = _timed(name, caller.name, impl.function)
                        impl.function._memplug_traced = True
        return name

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self._info.pop(name, None)

    def tiers(self) -> list[object]:
        """Registered tiers (plugins with a level), lowest level first."""
        found = [p for p in self.pm.get_plugins() if getattr(p, "level", None) is not None]
        return sorted(found, key=lambda p: (p.level, p.name))

    def info(self) -> list[PluginInfo]:
        rows = []
        for name, plugin in self.pm.list_name_plugin():
            hooks = tuple(sorted(h.name for h in self.pm.get_hookcallers(plugin) or ()))
            version, source = self._info.get(name, (None, "registered in code"))
            rows.append(PluginInfo(name, hooks, version, getattr(plugin, "level", None), source))
        return sorted(rows, key=lambda r: r.name)
