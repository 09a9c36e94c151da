"""Settings: explicit arguments first, then ``MEMPLUG_*`` environment variables, then defaults."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def default_home() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("memplug"))


def flag(raw: Any) -> bool:
    """A yes/no setting: a bool, or one of 1/0, true/false, yes/no, on/off (any case)."""
    if isinstance(raw, bool):
        return raw
    word = str(raw).strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{raw!r} is not a yes/no value")


@dataclass(frozen=True)
class Settings:
    """How one :class:`~memplug.Memory` is set up.

    ``options`` carries plugin settings; a plugin reads them with :meth:`option`, which
    falls back to ``MEMPLUG_<NAME>`` in the environment, so every knob can be set either way.
    """

    home: Path = field(default_factory=lambda: Path(os.environ.get("MEMPLUG_HOME") or default_home()))
    # Left out of repr: a DSN may carry a password.
    dsn: str | None = field(default_factory=lambda: os.environ.get("MEMPLUG_DSN") or None, repr=False)
    # Unset means "all installed"; set but empty means "none" (only those passed in code).
    plugins: str | None = field(default_factory=lambda: os.environ.get("MEMPLUG_PLUGINS"))
    model: str | None = field(default_factory=lambda: os.environ.get("MEMPLUG_MODEL") or None)
    options: Mapping[str, Any] = field(default_factory=dict)

    def option(self, name: str, default: T, cast: Callable[[Any], T] | None = None) -> T:
        """A plugin setting: ``options[name]``, else ``$MEMPLUG_<NAME>``, else ``default``."""
        env = "MEMPLUG_" + name.upper()
        if name in self.options:
            raw, source = self.options[name], f"option {name!r}"
        elif os.environ.get(env):
            raw, source = os.environ[env], env
        else:
            return default
        cast = cast or type(default)
        try:
            return cast(raw)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}={raw!r} is not a valid {getattr(cast, '__name__', cast)}") from e

    @property
    def max_text_chars(self) -> int:
        return self.positive("max_text_chars", 32_000)

    @property
    def max_metadata_bytes(self) -> int:
        return self.positive("max_metadata_bytes", 64 * 1024)

    def positive(self, name: str, default: int) -> int:
        """An int setting that must be at least 1 (:meth:`option`, then checked)."""
        v = self.option(name, default, int)
        if v <= 0:
            raise ConfigError(f"setting {name} must be positive, got {v}")
        return v
