"""Declared options: every setting of memplug and of its plugins, in one registry.

A plugin declares its options once, as a tuple of :class:`Option` in its
``options`` attribute; the host declares its own below. A value comes from
``Memory(options={...})`` first, then the ``MEMPLUG_<NAME>`` environment
variable, then the declared default, and is cast and range-checked on the way.
An option nobody declared is refused with the closest valid name, so a typo
(``context_token``) never goes unnoticed. ``memplug options`` lists them and
``docs/settings.md`` is generated from them (:func:`settings_markdown`).
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, PluginError

HOST = "memplug"
ENV_PREFIX = "MEMPLUG_"
# Variables that are not options: read before any plugin loads, or by the test kit.
ENVIRONMENT = {
    "MEMPLUG_HOME": "Where memplug keeps its data: the embedded Postgres, converted models, artifacts "
                    "(default: the user data folder).",
    "MEMPLUG_DSN": "A Postgres with pgvector to use instead of the embedded server "
                   "(postgresql://user:password@host:port/dbname).",
    "MEMPLUG_PLUGINS": "Which installed plugins load: `context,pgvector` only those, `-kv` all but kv, "
                       "`+profile` all and the opt-in plugin profile too, empty none.",
    "MEMPLUG_MODEL": "A Hugging Face causal LM (local path or cached id) instead of the packaged SmolLM2.",
    "MEMPLUG_DEVICE": "The torch device of the local model (default: cuda if there is one, else cpu).",
    "MEMPLUG_TRACE": "Trace every hook call with its time: 1 prints to standard error, a path appends to that file.",
    "MEMPLUG_URL": "The memplug server `memplug.client.Client()` talks to (default: http://127.0.0.1:8080).",
    "MEMPLUG_API_KEY": "The API key `memplug.client.Client()` sends (made with `memplug keys create`).",
}
TEST_PREFIX = "MEMPLUG_TEST_"  # the conformance kit's and the test suite's own variables


def flag(raw: Any) -> bool:
    """A yes/no value: a bool, or one of 1/0, true/false, yes/no, on/off (any case)."""
    if isinstance(raw, bool):
        return raw
    word = str(raw).strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{raw!r} is not a yes/no value")


def _to_int(raw: Any) -> int:
    if isinstance(raw, bool):
        raise ValueError("a yes/no value is not a number")
    if isinstance(raw, str):
        try:
            return int(raw.strip())
        except ValueError:
            raw = float(raw)  # "1e8"
    if isinstance(raw, float):
        if not raw.is_integer():
            raise ValueError(f"{raw!r} is not a whole number")
        return int(raw)
    return int(raw)


def _to_float(raw: Any) -> float:
    if isinstance(raw, bool):
        raise ValueError("a yes/no value is not a number")
    value = float(raw)
    if math.isnan(value):
        raise ValueError("NaN is not a number")
    return value


def _to_str(raw: Any) -> str:
    if not isinstance(raw, str):
        raise TypeError(f"expected text, got {type(raw).__name__}")
    return raw


def path_or_url(raw: Any) -> str | None:
    """A folder path (str or path object) or a URL, as text; an empty one is unset (None)."""
    if isinstance(raw, str | os.PathLike):
        value = os.fspath(raw)
        if isinstance(value, str):
            return value if value.strip() else None
    raise ValueError(f"expected a folder path or a URL, got {raw!r}")


# How a raw value (from code, or a string from the environment) becomes an option's value.
_CASTS: dict[Any, Callable[[Any], Any]] = {bool: flag, int: _to_int, float: _to_float, str: _to_str}


@dataclass(frozen=True)
class Option:
    """One setting: its name, type, default, allowed range and a help line.

    ``type`` is ``int``, ``float``, ``str``, ``bool`` (yes/no words accepted) or
    any callable that turns a raw value (from code, or a string from the
    environment) into the value, raising ``ValueError`` or ``TypeError`` when it
    cannot. ``min``/``max`` bound numbers inclusively, ``gt``/``lt`` exclusively;
    ``choices`` lists the allowed values. A ``None`` default means "unset" (the
    help line says what happens then).
    """

    name: str
    type: Any
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    gt: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | None = None
    metavar: str | None = field(default=None, compare=False)  # how docs name a custom type

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier() or self.name != self.name.lower():
            raise PluginError(f"option name {self.name!r} must be a lower_snake_case identifier")
        if not callable(self.type):
            raise PluginError(f"option {self.name}: type must be a type or a callable, got {self.type!r}")
        if not isinstance(self.help, str) or not self.help.strip():
            raise PluginError(f"option {self.name} needs a help line")

    @property
    def env(self) -> str:
        """The environment variable that sets it."""
        return ENV_PREFIX + self.name.upper()

    @property
    def kind(self) -> str:
        """The type as the docs show it."""
        return self.metavar or getattr(self.type, "__name__", "value")

    @property
    def allowed(self) -> str:
        """The allowed range in words ('' when anything of the type goes)."""
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices)
        parts = []
        if self.gt is not None:
            parts.append(f"> {self.gt:g}")
        if self.min is not None:
            parts.append(f">= {self.min:g}")
        if self.max is not None:
            parts.append(f"<= {self.max:g}")
        if self.lt is not None:
            parts.append(f"< {self.lt:g}")
        return ", ".join(parts)

    def parse(self, raw: Any, source: str, owner: str) -> Any:
        """``raw`` cast and checked; a :class:`ConfigError` naming ``source`` and ``owner`` if it is not valid."""
        where = f"{source}={raw!r} ({'memplug' if owner == HOST else 'plugin ' + owner})"
        if raw is None and self.default is None:
            return None
        try:
            value = _CASTS.get(self.type, self.type)(raw)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where} is not a valid {self.kind}: {e}") from None
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{where} must be {self.allowed}")
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{where} is not a finite number")
            if ((self.gt is not None and not value > self.gt) or (self.min is not None and not value >= self.min)
                    or (self.max is not None and not value <= self.max)
                    or (self.lt is not None and not value < self.lt)):
                raise ConfigError(f"{where} is out of range: it must be {self.allowed}")
        return value


# -- the host's own options ----------------------------------------------------------------------

DAY = 24 * 3600.0
HOST_OPTIONS = (
    Option("pool_size", int, 10, "Postgres connections one Memory keeps open at most.", min=1),
    Option("max_text_chars", int, 32_000, "Longest text (or query) accepted, in characters.", min=1),
    Option("max_metadata_bytes", int, 64 * 1024, "Largest metadata accepted, as JSON bytes.", min=1),
    Option("embedder_runtime", str, "auto", "How the embedder runs: auto (a query or two through all-MiniLM-L6-v2 "
           "quantized to int8 in ONNX Runtime, batches in torch) or torch (everything in torch).",
           choices=("auto", "torch")),
    Option("relevance_floor", float, 0.0, "Hits less relevant than this are left out of a read (the pgvector "
           "tier's relevance: cosine similarity to the query); a read's min_relevance overrides it. 0: off.",
           min=-1, max=1),
    Option("heat_half_life_s", float, 7 * DAY,
           "Seconds for an unread item's heat (decayed read count, what the policies read) to halve.", gt=0),
    Option("artifacts", path_or_url, None,
           "Where tiers keep derived artifacts (KV blobs, adapters): a folder or an fsspec URL such as "
           "s3://bucket/memplug. Unset: $MEMPLUG_HOME/artifacts.", metavar="path or URL"),
    Option("backend", str, "hf", "What generates replies: hf (the model in this process, with injected KV memory "
           "and adapter slots) or vllm (a vLLM server, started here or at vllm_url, serving each user's adapter "
           "by name; KV memory is given as text).", choices=("hf", "vllm")),
    Option("vllm_url", str, "", "The vLLM server's base URL (http://host:8000). Empty: start one on this "
           "machine, or use the one another process started."),
    Option("vllm_python", str, "", "The Python of vLLM's own environment, for a server started here. Empty: "
           "the environment `memplug vllm setup` makes in the user cache folder."),
    Option("vllm_max_loras", int, 8, "Adapters one batch of a server started here can mix (--max-loras); "
           "more are kept in host memory and swapped in.", min=1),
    Option("vllm_max_lora_rank", int, 16, "Highest adapter rank a server started here accepts (--max-lora-rank): "
           "one of 1, 8, 16, 32, 64, 128, 256, 320, 512.", min=1),
    Option("vllm_artifacts_path", str, "", "Where the vLLM server reads the artifact store (a folder on its "
           "machine, such as an s3 bucket's mount). Empty: the store's own folder when it is local; a remote "
           "store's adapters are then copied to $MEMPLUG_HOME/vllm/adapters, for a server on this machine."),
    Option("vllm_args", str, "", "More arguments for a server started here (`vllm serve` flags, split as a "
           "shell would)."),
    Option("vllm_start_timeout_s", float, 300.0, "Seconds a server started here may take to become healthy.",
           gt=0),
    Option("vllm_base_adapter", flag, True, "Send requests without an adapter to an all-zero adapter: vLLM's "
           "CPU build may otherwise apply the adapter of another request in the batch.", metavar="bool"),
    Option("job_attempts", int, 3, "Tries of a consolidation job before it is marked failed.", min=1),
    Option("job_retry_wait_s", float, 5.0, "Seconds between a failed job's tries.", min=0),
    Option("job_stalled_s", float, 30.0,
           "Seconds without a heartbeat after which a worker counts as dead and its jobs are re-queued.", gt=0),
)


class OptionRegistry:
    """The options declared by the host and by each plugin, by name."""

    def __init__(self) -> None:
        self._options: dict[str, Option] = {}
        self._owners: dict[str, list[str]] = {}
        self.declare(HOST, HOST_OPTIONS)

    def declare(self, owner: str, options: Iterable[Option]) -> None:
        """Add ``owner``'s options. Two plugins may declare one name only with the same declaration
        (policies sharing ``policy``); anything else is a :class:`PluginError`."""
        options = tuple(options)
        for opt in options:
            if not isinstance(opt, Option):
                raise PluginError(f"plugin {owner!r}: options must be memplug.plugin.Option values, "
                                  f"got {type(opt).__name__}")
            known = self._options.get(opt.name)
            if known is not None and known != opt:
                raise PluginError(f"plugin {owner!r} declares option {opt.name!r}, already declared differently "
                                  f"by {', '.join(self._owners[opt.name])}")
        for opt in options:
            self._options[opt.name] = opt
            owners = self._owners.setdefault(opt.name, [])
            if owner not in owners:
                owners.append(owner)

    def forget_owner(self, owner: str) -> None:
        """Drop what ``owner`` declared (a plugin unregistered); options others declare too stay."""
        for name in [n for n, owners in self._owners.items() if owner in owners]:
            self._owners[name].remove(owner)
            if not self._owners[name]:
                del self._owners[name], self._options[name]

    def __contains__(self, name: object) -> bool:
        return name in self._options

    def get(self, name: str) -> Option:
        opt = self._options.get(name)
        if opt is None:
            raise ConfigError(self.unknown(name))
        return opt

    def owner(self, name: str) -> str:
        return self._owners[name][0]

    def owners(self, name: str) -> list[str]:
        return list(self._owners[name])

    def all(self) -> list[tuple[str, Option]]:
        """``(owner, option)`` pairs, the host's first, then by plugin and name."""
        return sorted(((self._owners[n][0], o) for n, o in self._options.items()),
                      key=lambda p: (p[0] != HOST, p[0], p[1].name))

    def unknown(self, name: str, source: str | None = None) -> str:
        """The message for an option nobody declared, naming the closest valid one."""
        what = source or f"option {name!r}"
        close = difflib.get_close_matches(name, list(self._options), n=1, cutoff=0.6)
        if close:
            owner = self.owner(close[0])
            hint = ENV_PREFIX + close[0].upper() if source and source.startswith(ENV_PREFIX) else close[0]
            return (f"{what} is not a memplug setting; did you mean {hint} "
                    f"({'of memplug' if owner == HOST else 'of plugin ' + owner})? `memplug options` lists them all")
        return f"{what} is not a memplug setting; `memplug options` lists them all"

    def value(self, name: str, given: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Any:
        """The value of ``name``: ``given[name]``, else ``$MEMPLUG_<NAME>``, else the default; checked."""
        opt = self.get(name)
        environ = os.environ if environ is None else environ
        if name in given:
            return opt.parse(given[name], f"option {name}", self.owner(name))
        raw = environ.get(opt.env)
        if raw:
            return opt.parse(raw, opt.env, self.owner(name))
        return opt.default

    def check(self, given: Mapping[str, Any], environ: Mapping[str, str] | None = None,
              more: Callable[[], None] | None = None) -> None:
        """Refuse unknown names and invalid values in ``given`` and in ``MEMPLUG_*`` variables.

        ``more`` is called once before an unknown name is refused: it may declare more
        options (those of installed plugins not loaded here), which are then accepted.
        """
        environ = os.environ if environ is None else environ
        odd = [n for n in given if not isinstance(n, str)]
        if odd:
            raise ConfigError(f"option names must be strings, got {odd[0]!r}")
        names = [(n, f"option {n!r}") for n in given]
        names += [(k[len(ENV_PREFIX):].lower(), k) for k, v in environ.items()
                  if k.startswith(ENV_PREFIX) and k not in ENVIRONMENT and not k.startswith(TEST_PREFIX) and v]
        for name, source in names:
            if name not in self and more is not None:
                more()
                more = None
            if name not in self:
                raise ConfigError(self.unknown(name, source))
        for name, _ in names:
            self.value(name, given, environ)


def settings_markdown(registry: OptionRegistry) -> str:
    """``docs/settings.md``: the environment variables, then every declared option by plugin."""
    lines = [
        "# Settings",
        "",
        "<!-- Generated from the option declarations by `memplug options --markdown`; do not edit. -->",
        "",
        "Every option can be given in code, `Memory(options={\"name\": value})`, or as the environment",
        "variable `MEMPLUG_<NAME>`; code wins. An unknown name or a value out of range is a `ConfigError`",
        "that names the closest valid option. `memplug options` prints this list with the values in effect.",
        "",
        "## Environment",
        "",
        "| variable | what it sets |",
        "|---|---|",
    ]
    lines += [f"| `{k}` | {v} |" for k, v in ENVIRONMENT.items()]
    owner = None
    for who, opt in registry.all():
        if who != owner:
            owner = who
            lines += ["", f"## {'memplug (the host)' if who == HOST else who}", "",
                      "| option | type | default | allowed | what it does |", "|---|---|---|---|---|"]
        default = "unset" if opt.default is None else f"`{opt.default!r}`"
        lines.append(f"| `{opt.name}` | {opt.kind} | {default} | {opt.allowed or 'any'} | "
                     f"{opt.help.replace('|', '/')} |")
    return "\n".join(lines) + "\n"
