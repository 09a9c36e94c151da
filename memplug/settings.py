"""Settings: explicit arguments first, then ``MEMPLUG_*`` environment variables, then defaults.

:class:`Settings` holds what is decided before any plugin loads: where memplug
keeps its data, which Postgres and plugins it uses, and the local model. Every
other setting is a declared option (:mod:`memplug.options`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def default_home() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("memplug"))


@dataclass(frozen=True)
class Settings:
    """How one :class:`~memplug.Memory` is set up.

    ``options`` carries the values of declared options (``memplug options`` lists them);
    each falls back to its ``MEMPLUG_<NAME>`` variable, then to its default.
    """

    home: Path = field(default_factory=lambda: Path(os.environ.get("MEMPLUG_HOME") or default_home()))
    # Left out of repr: a DSN may carry a password.
    dsn: str | None = field(default_factory=lambda: os.environ.get("MEMPLUG_DSN") or None, repr=False)
    # Unset means "all installed"; set but empty means "none" (only those passed in code).
    plugins: str | None = field(default_factory=lambda: os.environ.get("MEMPLUG_PLUGINS"))
    model: str | None = field(default_factory=lambda: os.environ.get("MEMPLUG_MODEL") or None)
    options: Mapping[str, Any] = field(default_factory=dict)

    def option(self, name: str, default: Any, cast: Callable[[Any], Any] | None = None) -> Any:
        """Deprecated: declare the option in the plugin's ``options`` and read it with
        ``memory.option(name)``. Kept so that plugins written for memplug 0.1 still load;
        an undeclared option can no longer be set (it is refused as unknown)."""
        from .errors import ConfigError

        warnings.warn(f"Settings.option({name!r}) is deprecated: declare the option (memplug.plugin.Option) and "
                      "read it with memory.option()", DeprecationWarning, stacklevel=2)
        raw = self.options.get(name, os.environ.get("MEMPLUG_" + name.upper()) or None)
        if raw is None:
            return default
        try:
            return (cast or type(default))(raw)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"option {name}={raw!r} is not a valid {getattr(cast, '__name__', cast)}") from e
