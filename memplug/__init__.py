"""memplug: memory middleware for LLM agents.

    from memplug import Memory, Scope, Budget
    mem = Memory()
    mem.write(Scope("alice"), "I moved to Lisbon in May.")
    print(mem.read(Scope("alice"), "where does alice live?").as_text())
"""

from .errors import (
    AccessDenied,
    ArtifactCorrupt,
    ConfigError,
    InvalidInput,
    InvalidScope,
    MemplugError,
    ModelMismatch,
    ModelUnavailable,
    NotFound,
    PluginError,
    RateLimited,
    ScopeViolation,
    ServerUnavailable,
    StoreUnavailable,
    Unauthenticated,
)
from .hookspecs import hookimpl
from .memory import Memory
from .options import Option
from .settings import Settings
from .types import (
    AdapterRef,
    Answer,
    Budget,
    Hit,
    Item,
    KVPrefix,
    Move,
    Placement,
    Recall,
    Scope,
    TierCost,
    Window,
)
from .usage import ItemUsage

__version__ = "0.1.0"

__all__ = [
    "AccessDenied", "AdapterRef", "Answer", "ArtifactCorrupt", "Budget", "ConfigError", "Hit", "InvalidInput", "InvalidScope", "Item", "KVPrefix",
    "ItemUsage", "MemplugError", "Memory", "ModelMismatch", "ModelUnavailable", "Move", "NotFound", "Option",
    "Placement", "PluginError", "RateLimited", "Recall", "Scope", "ScopeViolation", "ServerUnavailable", "Settings", "StoreUnavailable", "TierCost", "Unauthenticated", "Window", "hookimpl",
]
