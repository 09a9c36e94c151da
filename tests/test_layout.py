"""The shape of the project: what the package holds, what plugins may import, and docs that follow the code."""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What a tier, an example plugin or the scaffold's tier may import of memplug: the plugin SDK, the
# public names of the package and of its runtime, and the test kit (in their tests).
ALLOWED = {"memplug", "memplug.plugin", "memplug.runtime", "memplug.testing"}


def memplug_imports(source: str, where: str) -> list[str]:
    """Every import of memplug in ``source`` that a plugin may not make, as ``where:line what``."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found = [(node.module, a.name) for a in node.names]
        else:
            continue
        for module, name in found:
            if module != "memplug" and not module.startswith("memplug."):
                continue
            if module not in ALLOWED or any(part.startswith("_") for part in module.split(".")):
                bad.append(f"{where}:{node.lineno} {module}")
            elif name is not None and name.startswith("_"):
                bad.append(f"{where}:{node.lineno} {module}.{name}")
    return bad


def test_plugins_and_examples_import_only_the_plugin_sdk():
    files = [p for folder in ("plugins", "examples") for p in (ROOT / folder).rglob("*.py")]
    assert len(files) > 10
    bad = [b for p in files for b in memplug_imports(p.read_text(), str(p.relative_to(ROOT)))]
    assert bad == [], "plugins and examples may import only memplug.plugin and public memplug names"


def test_the_checker_catches_what_it_should():
    assert memplug_imports("from memplug.memory import ITEM_COLUMNS", "x") == ["x:1 memplug.memory"]
    assert memplug_imports("import memplug.store", "x") == ["x:1 memplug.store"]
    assert memplug_imports("from memplug.runtime import _cache_of", "x") == ["x:1 memplug.runtime._cache_of"]
    assert memplug_imports("from memplug.plugin import Hit\nfrom memplug_kv import KVTier\nimport numpy", "x") == []


def test_the_scaffold_and_the_plugin_docs_import_only_the_plugin_sdk(tmp_path):
    from memplug.scaffold import new_plugin

    root = new_plugin("my-tier", tmp_path)
    bad = [b for p in root.rglob("*.py") for b in memplug_imports(p.read_text(), p.name)]
    for doc in ("hooks.md", "writing-plugins.md"):
        for n, block in enumerate(re.findall(r"```python\n(.*?)```", (ROOT / "docs" / doc).read_text(), re.S)):
            imports = re.findall(r"^(?:from memplug\S* import (?:\([^)]*\)|[^\n]*)|import memplug[^\n]*)", block, re.M)
            assert imports or "memplug" not in block or "import" not in block, (doc, n)
            bad += memplug_imports("\n".join(imports), f"{doc} block {n}")
    assert bad == []


def test_the_wheel_holds_the_product_and_no_benchmark(tmp_path):
    import shutil

    # Built from a copy: a build writes into its source tree.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info",
                                                                "__pycache__", "results", "memplug-demo"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    [wheel] = tmp_path.glob("memplug-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "memplug/plugin.py" in names and "memplug_lora/replay_prompts.json" in names
    research = [n for n in names if n.startswith("benchmarks/") or "/bench/" in n
                or re.search(r"(general|near)_questions\.json|heldout_text\.txt|results/", n)
                or n.split("/")[-1] in ("kv.py", "lora.py", "policy.py", "speed.py", "lora_repeat.py")
                and n.startswith(("memplug/checks/", "memplug/bench"))]
    assert research == []
    assert {n for n in names if n.startswith("memplug/checks/")} == {
        "memplug/checks/__init__.py", "memplug/checks/facts.py", "memplug/checks/load.py", "memplug/checks/store.py"}


def test_docs_settings_is_generated_from_the_option_declarations():
    from memplug.options import settings_markdown
    from memplug.plugins import builtin_options

    current = (ROOT / "docs" / "settings.md").read_text()
    assert current == settings_markdown(builtin_options()), \
        "docs/settings.md is stale: run `memplug options --markdown > docs/settings.md`"
    for name in ("context_tokens", "pgvector_mode", "kv_codec", "lora_rank", "policy", "heat_half_life_s"):
        assert f"| `{name}` |" in current


def test_every_builtin_option_is_read_by_its_plugin():
    """An option declared but never read would be a setting that does nothing."""
    from memplug.plugins import builtin_options

    sources = "\n".join(p.read_text() for p in [*(ROOT / "plugins").rglob("*.py"), *(ROOT / "memplug").glob("*.py")])
    unread = [opt.name for _, opt in builtin_options().all()
              if not re.search(rf"""option\(["']{opt.name}["']\)""", sources)
              and not re.search(rf"""["']{opt.name}["'], ["']\w+["']""", sources)]  # the lora TRAINING table
    assert unread == []


def test_architecture_names_every_table_the_host_owns():
    from memplug.store import HOST_MIGRATIONS

    tables = re.findall(r"CREATE TABLE (\w+)", "\n".join(HOST_MIGRATIONS))
    assert sorted(tables) == ["items", "moves", "placements", "tier_costs", "usage"]
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert "The host owns five tables" in text
    assert all(f"- `{t}`:" in text for t in tables)


def test_hooks_doc_names_every_builtin_tier():
    from importlib.metadata import entry_points

    tiers = sorted(ep.name for ep in entry_points(group="memplug") if ep.dist.name == "memplug"
                   and getattr(ep.load(), "level", None) is not None)
    assert tiers == ["context", "kv", "lora", "pgvector"]
    intro = (ROOT / "docs" / "hooks.md").read_text().split("```")[0]
    assert "four built-in tiers" in intro and all(f"`{t}`" in intro for t in tiers)


def test_the_read_hook_says_what_a_tier_may_return():
    from memplug import hookspecs

    doc = inspect.getdoc(hookspecs.memplug_read)
    for name in ("Hit", "KVPrefix", "AdapterRef", "pinned", "Recall.pinned"):
        assert name in doc, name


def test_the_readme_is_for_users():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert readme.index("make demo") < readme.index("make test") < 1500  # the two commands open it
    assert not re.search(r"\b\d{1,2}:\d{2}\b", readme), "no benchmark runs by time of day"
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), target


def test_the_docs_site_builds_with_no_broken_link(tmp_path):
    pytest.importorskip("mkdocs")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_benchmark_results_keep_the_latest_run_only():
    results = ROOT / "benchmarks" / "results"
    assert not [p for p in results.iterdir() if p.is_dir()], "experiment folders belong in git's history"
