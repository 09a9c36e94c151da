"""Where derived artifacts (KV blobs, adapters) live: a local folder, or any fsspec URL.

Set ``MEMPLUG_ARTIFACTS`` (or the ``artifacts`` option) to ``s3://bucket/prefix``
or another fsspec URL to share artifacts between machines; the default is
``$MEMPLUG_HOME/artifacts``. Paths are relative keys such as
``kv/<fingerprint>/<user>/<item>.safetensors``. Writes are all-or-nothing: a
reader sees the old blob or the whole new one, never a part.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import ArtifactCorrupt, ConfigError, InvalidInput, StoreUnavailable


def write_atomic(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` via a temporary file and a rename: a concurrent
    reader sees the old file or the whole new one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ArtifactStore:
    """Blobs under one root: ``put``, ``get``, ``delete`` by relative key."""

    def __init__(self, root: str | Path):
        root = str(root)
        self.local = "://" not in root or root.startswith("file://")
        if self.local:
            self.root = Path(root.removeprefix("file://")).expanduser()
            self.url = str(self.root)
            self.fs = None
        else:
            try:
                import fsspec

                self.fs, path = fsspec.core.url_to_fs(root)
            except (ImportError, ValueError) as e:
                raise ConfigError(f"artifact store {root!r} is not usable: {e} (pip install 'memplug[kv]' "
                                  f"and the fsspec backend for its protocol)") from e
            self.root = path.rstrip("/")
            self.url = root

    def _key(self, key: str) -> str:
        """``key`` if it names a file under the root, else InvalidInput: no absolute paths, no '.' or
        '..' parts, no backslashes or control characters, and (for a local folder) no symbolic link
        that leads out of the root."""
        if not isinstance(key, str):
            raise InvalidInput(f"artifact key must be a str, got {type(key).__name__}")
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise InvalidInput(f"artifact key {key!r} must be a relative path without '.' or '..' parts")
        if "\\" in key or any(ord(c) < 32 or ord(c) == 127 for c in key):
            raise InvalidInput(f"artifact key {key!r} may not hold backslashes or control characters")
        if self.local:
            root = self.root.resolve()
            if not (root / key).resolve().is_relative_to(root):
                raise InvalidInput(f"artifact key {key!r} leads out of the artifact root {self.root} "
                                   "through a symbolic link; nothing was read or written")
        return key

    def uri(self, key: str) -> str:
        return f"{self.url.rstrip('/')}/{self._key(key)}"

    def put(self, key: str, data: bytes) -> str:
        """Store ``data`` under ``key`` (replacing it atomically); return its URI."""
        key = self._key(key)
        try:
            if self.local:
                write_atomic(self.root / key, data)
            else:
                self.fs.pipe_file(f"{self.root}/{key}", data)
        except OSError as e:
            raise StoreUnavailable(f"could not write artifact {self.uri(key)}: {e}") from e
        return self.uri(key)

    def get(self, key: str) -> bytes:
        key = self._key(key)
        try:
            if self.local:
                return (self.root / key).read_bytes()
            return self.fs.cat_file(f"{self.root}/{key}")
        except FileNotFoundError:
            raise ArtifactCorrupt(f"artifact {self.uri(key)} is missing") from None
        except OSError as e:
            raise StoreUnavailable(f"could not read artifact {self.uri(key)}: {e}") from e

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""
        key = self._key(key)
        try:
            if self.local:
                (self.root / key).unlink(missing_ok=True)
            elif self.fs.exists(f"{self.root}/{key}"):
                self.fs.rm_file(f"{self.root}/{key}")
        except OSError as e:
            raise StoreUnavailable(f"could not delete artifact {self.uri(key)}: {e}") from e

    def list(self, prefix: str) -> list[str]:
        """The keys of every file under ``prefix`` (a folder key), sorted; none if it does not exist."""
        prefix = self._key(prefix).rstrip("/")
        try:
            if self.local:
                base = self.root / prefix
                if not base.is_dir():
                    return []
                return sorted(f"{prefix}/{p.relative_to(base).as_posix()}" for p in base.rglob("*")
                              if p.is_file() and not p.name.startswith(".tmp"))
            found = self.fs.find(f"{self.root}/{prefix}") if self.fs.exists(f"{self.root}/{prefix}") else []
            return sorted(f.removeprefix(self.root).lstrip("/") for f in found)
        except OSError as e:
            raise StoreUnavailable(f"could not list artifacts under {self.uri(prefix)}: {e}") from e

    def exists(self, key: str) -> bool:
        key = self._key(key)
        return (self.root / key).is_file() if self.local else self.fs.exists(f"{self.root}/{key}")
