"""Loading plugins: built-in tiers and third-party ones come through the same door.

Every plugin is found through the ``memplug`` entry-point group. An entry point
names a class (instantiated once per Memory) or an object. ``MEMPLUG_PLUGINS``
restricts what loads: ``context,pgvector`` loads only those; ``-kv`` loads all
but ``kv``; ``+profile`` loads all and the opt-in plugin ``profile`` too; an
empty value loads none (only plugins passed in code).

A plugin may say more about itself with three attributes:

- ``options``: its :class:`~memplug.options.Option` declarations (see :mod:`memplug.options`);
- ``requires``: modules it needs beyond memplug's own, and ``install``, the command that
  installs them. An installed plugin whose modules are missing is listed as
  unavailable (``memplug plugins``, ``memplug doctor``) and not loaded, so no policy
  plans moves to its level;
- ``opt_in = True``: installing it does not activate it; it loads only when
  ``MEMPLUG_PLUGINS`` names it, or when passed in code (the example plugins);
- ``needs_backend``: what it needs of the generation backend (option ``backend``):
  ``"kv"`` (injected attention key/values), ``"adapters"`` (per-request LoRA
  adapters). With a backend that lacks one, the plugin is listed as unavailable,
  as for a missing module (the kv tier with the ``vllm`` backend).

``MEMPLUG_TRACE`` traces every hook call of every plugin with its time, on the
``memplug.trace`` logger: ``1`` (or ``stderr``) prints the lines to standard
error, a path appends them to that file.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError
from .options import HOST, OptionRegistry

GROUP = "memplug"
log = logging.getLogger(__name__)
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
    status: str = "loaded"  # loaded, unavailable (a requirement is missing), opt-in (installed, not named)
    detail: str = ""  # for an unavailable plugin: what is missing and the command that installs it


# What each generation backend can do with a read's memory besides text.
BACKEND_FEATURES = {"hf": frozenset({"kv", "adapters"}), "vllm": frozenset({"adapters"})}


def missing_requirements(plugin: object) -> list[str]:
    """The modules in ``plugin.requires`` that cannot be imported here."""
    requires = getattr(plugin, "requires", ()) or ()
    if isinstance(requires, str):
        requires = (requires,)
    missing = []
    for module in requires:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package is missing, or the module was blocked
            found = False
        if not found:
            missing.append(module)
    return missing


def unavailable_reason(plugin: object, missing: list[str]) -> str:
    install = getattr(plugin, "install", None) or f"pip install {' '.join(missing)}"
    return f"needs {', '.join(missing)}: {install}"


def _opt_in_detail(name: str) -> str:
    return f"active only when MEMPLUG_PLUGINS names it (+{name})"


def _not_loaded(obj: object, name: str, named: set[str]) -> tuple[str, str] | None:
    """``(status, detail)`` of an installed plugin that does not load here, or None if it loads."""
    if getattr(obj, "opt_in", False) and name not in named:
        return "opt-in", _opt_in_detail(name)
    missing = missing_requirements(obj)
    return ("unavailable", unavailable_reason(obj, missing)) if missing else None


def parse_selection(spec: str | None) -> tuple[set[str] | None, set[str], set[str]]:
    """``(allowed or None for all, blocked, opted in)`` from a MEMPLUG_PLUGINS value.

    Plain names list what loads; ``-name`` leaves a plugin out of all the others; ``+name``
    activates an opt-in plugin on top of all the others. An empty value loads none.
    """
    if spec is None:
        return None, set(), set()
    names = [n.strip() for n in spec.split(",") if n.strip()]
    blocked = {n[1:] for n in names if n.startswith("-")}
    added = {n[1:] for n in names if n.startswith("+")}
    allowed = {n for n in names if not n.startswith(("-", "+"))}
    if (blocked or added) and not allowed:
        return None, blocked, added
    return allowed | added, blocked, added


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
        self.options = OptionRegistry()
        self._info: dict[str, tuple[str | None, str]] = {}
        self._inactive: dict[str, PluginInfo] = {}  # installed but not loaded: unavailable or opt-in
        self._installed_declared = False
        self._left_out: dict[str, str] = {}  # installed plugins MEMPLUG_PLUGINS leaves out: why
        allowed, blocked, added = parse_selection(selection)
        if load_entrypoints:
            self._load_entrypoints(allowed, blocked, added)
        for plugin in extra:
            self.register(plugin)

    def _load_entrypoints(self, allowed: set[str] | None, blocked: set[str], added: set[str]) -> None:
        eps = {ep.name: ep for ep in entry_points(group=GROUP)}
        unknown = ((allowed or set()) | blocked | added) - set(eps)
        if unknown:
            raise PluginError(
                f"MEMPLUG_PLUGINS names unknown plugin(s): {', '.join(sorted(unknown))}; "
                f"installed: {', '.join(sorted(eps)) or 'none'}"
            )
        for name, ep in sorted(eps.items()):
            if (allowed is not None and name not in allowed) or name in blocked:
                continue
            obj = _load(name, ep)
            version = ep.dist.version if ep.dist is not None else None
            source = f"entry point {ep.value}"
            inactive = _not_loaded(obj, name, (allowed or set()) | added)
            if inactive is not None:
                status, detail = inactive
                self._inactive[name] = PluginInfo(name, (), version, getattr(obj, "level", None), source, status,
                                                  detail)
                self.options.declare(name, getattr(obj, "options", ()))
                log.info("plugin %s is %s: %s", name, status, detail)
                continue
            plugin = _instantiate(name, ep, obj)
            self.register(plugin, name=name, version=version, source=source)

    def declare_installed(self) -> None:
        """Declare the options of every installed plugin, loaded here or not (once).

        An option of a plugin that ``MEMPLUG_PLUGINS`` leaves out is still a valid setting.
        """
        if self._installed_declared:
            return
        self._installed_declared = True
        for ep in entry_points(group=GROUP):
            if self.pm.has_plugin(ep.name) or ep.name in self._inactive:
                continue
            try:
                obj = ep.load()
                self.options.declare(ep.name, getattr(obj, "options", ()))
                self._left_out[ep.name] = ("opt-in, " + _opt_in_detail(ep.name) if getattr(obj, "opt_in", False)
                                           else "left out by MEMPLUG_PLUGINS")
            except Exception:  # noqa: BLE001 - a broken plugin that is not loaded here declares nothing
                log.debug("could not read the options of plugin %s", ep.name, exc_info=True)

    def warn_inactive(self, given: Mapping[str, Any]) -> None:
        """Log a warning for each option set (in ``given`` or the environment) whose plugins are
        all installed but not loaded: the setting does nothing here (an opt-in plugin not named)."""
        names = set(given) | {k[len("MEMPLUG_"):].lower() for k, v in os.environ.items()
                              if k.startswith("MEMPLUG_") and v}
        for name in sorted(n for n in names if n in self.options):
            owners = self.options.owners(name)
            if all(o != HOST and not self.pm.has_plugin(o) for o in owners):
                why = "; ".join(f"{o}: {self._inactive[o].detail}" if o in self._inactive
                                else f"{o}: {self._left_out.get(o, 'not loaded')}" for o in owners)
                log.warning("option %s is set, but no plugin that reads it is loaded here (%s)", name, why)

    def register(self, plugin: object, name: str | None = None, version: str | None = None,
                 source: str = "registered in code") -> str:
        name = name or getattr(plugin, "name", None) or None
        if name is None:
            name = self.pm.get_canonical_name(plugin)
        if self.pm.has_plugin(name):
            raise PluginError(f"a plugin named {name!r} is already registered")
        check_tier(plugin, name)
        missing = missing_requirements(plugin)
        if missing:
            raise PluginError(f"plugin {name!r} cannot load here: it {unavailable_reason(plugin, missing)}")
        self.options.declare(name, getattr(plugin, "options", ()))
        self._inactive.pop(name, None)
        try:
            self.pm.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as e:
            self.options.forget_owner(name)
            raise PluginError(f"plugin {name!r} is invalid: {e}") from e
        try:
            self.pm.check_pending()  # a misspelt hook name would otherwise never be called
        except pluggy.PluginValidationError as e:
            self.pm.unregister(plugin)
            self.options.forget_owner(name)
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

    def fit_backend(self, backend: str) -> None:
        """Set aside the plugins that need what ``backend`` cannot do (their ``needs_backend``): they are
        listed as unavailable and take part in nothing; their options stay valid settings."""
        features = BACKEND_FEATURES[backend]
        for name, plugin in list(self.pm.list_name_plugin()):
            needs = getattr(plugin, "needs_backend", ()) or ()
            lacking = sorted(({needs} if isinstance(needs, str) else set(needs)) - features)
            if not lacking:
                continue
            version, source = self._info.pop(name, (None, "registered in code"))
            self.pm.unregister(plugin)
            detail = f"the {backend} backend takes no {', '.join(lacking)} (option backend={backend})"
            self._inactive[name] = PluginInfo(name, (), version, getattr(plugin, "level", None), source,
                                              "unavailable", detail)
            log.info("plugin %s is unavailable: %s", name, detail)

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self._info.pop(name, None)
        self.options.forget_owner(name)

    def tiers(self) -> list[object]:
        """Registered tiers (plugins with a level), lowest level first."""
        found = [p for p in self.pm.get_plugins() if getattr(p, "level", None) is not None]
        return sorted(found, key=lambda p: (p.level, p.name))

    def levels(self) -> dict[int, str]:
        """The levels registered tiers hold, with a tier's name for each."""
        return {p.level: p.name for p in reversed(self.tiers())}

    def unavailable(self) -> list[PluginInfo]:
        """Installed plugins that could not load here (a requirement is missing)."""
        return [i for i in self._inactive.values() if i.status == "unavailable"]

    def info(self) -> list[PluginInfo]:
        """Every plugin: those loaded, then installed ones not loaded (unavailable, opt-in)."""
        rows = []
        for name, plugin in self.pm.list_name_plugin():
            hooks = tuple(sorted(h.name for h in self.pm.get_hookcallers(plugin) or ()))
            version, source = self._info.get(name, (None, "registered in code"))
            rows.append(PluginInfo(name, hooks, version, getattr(plugin, "level", None), source))
        rows += self._inactive.values()
        return sorted(rows, key=lambda r: r.name)


def builtin_options() -> OptionRegistry:
    """The options of memplug and of the plugins it ships (what ``docs/settings.md`` lists),
    whatever else is installed or selected here."""
    registry = OptionRegistry()
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        if ep.dist is not None and ep.dist.name == "memplug":
            registry.declare(ep.name, getattr(_load(ep.name, ep), "options", ()))
    return registry


def _load(name: str, ep: Any) -> Any:
    try:
        return ep.load()
    except Exception as e:
        raise PluginError(f"plugin {name!r} ({ep.value}) failed to load: {e}") from e


def _instantiate(name: str, ep: Any, obj: Any) -> Any:
    try:
        return obj() if isinstance(obj, type) else obj
    except Exception as e:
        raise PluginError(f"plugin {name!r} ({ep.value}) failed to load: {e}") from e
