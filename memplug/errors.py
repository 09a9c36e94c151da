"""Every failure a user of memplug can meet is a :class:`MemplugError`."""

from __future__ import annotations


class MemplugError(Exception):
    """Base class of all memplug errors. The message names what was wrong and what to do."""


class InvalidInput(MemplugError, ValueError):
    """An argument was of the wrong type, empty, too large or malformed."""


class InvalidScope(InvalidInput):
    """A scope id was missing, too long or used characters outside the allowed set."""


class ConfigError(MemplugError):
    """A setting (argument or ``MEMPLUG_*`` variable) is invalid."""


class StoreUnavailable(MemplugError):
    """Postgres could not be reached, or lacks what memplug needs (the ``vector`` extension)."""


class ScopeViolation(MemplugError):
    """Work scoped to one user tried to read or write another user's rows; row-level security refused it."""


class ModelUnavailable(MemplugError):
    """A local model (embedder, tokenizer, causal LM) could not be found or loaded."""


class ServerUnavailable(ModelUnavailable):
    """A model server (the ``vllm`` backend) could not be started or reached."""


class ModelMismatch(MemplugError):
    """A derived artifact was made by a different model than the one loaded."""


class ArtifactCorrupt(MemplugError):
    """A stored artifact (KV blob, adapter) is truncated or unreadable."""


class PluginError(MemplugError):
    """A plugin failed to load, or broke the rules of a hook."""


class NotFound(MemplugError, KeyError):
    """An item id does not exist in the given scope."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class AccessDenied(MemplugError, PermissionError):
    """An API key does not cover the user a request names (``memplug serve``, ``memplug mcp``)."""


class Unauthenticated(AccessDenied):
    """A request to a memplug server came without an API key, or with one that is malformed,
    unknown or revoked."""


class RateLimited(MemplugError):
    """Too many requests with one API key: retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after
