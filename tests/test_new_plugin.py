"""``memplug new-plugin`` writes a package whose tier passes the conformance suite as generated."""

from __future__ import annotations

import os
import subprocess
import sys

from click.testing import CliRunner

from memplug.cli import main


def test_generated_plugin_passes_its_conformance_tests(tmp_path):
    # Kebab case, as distributions are named: the package and the tier get the snake-case form.
    result = CliRunner().invoke(main, ["new-plugin", "recent-notes", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    root = tmp_path / "memplug-recent-notes"
    assert (root / "pyproject.toml").read_text().count('recent_notes = "memplug_recent_notes:RecentNotesTier"') == 1
    env = {**os.environ, "PYTHONPATH": str(root)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / "tests")],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "5 passed, 1 skipped" in run.stdout  # moves in and out do not apply at level 1

    assert "from memplug.plugin import" in (root / "memplug_recent_notes" / "__init__.py").read_text()

    again = CliRunner().invoke(main, ["new-plugin", "recent_notes", "--dir", str(tmp_path)])
    assert again.exit_code != 0 and "already exists" in again.output
    for bad_name in ("Bad-Name", "bad--name", "bad-", "bad_", "9lives"):
        bad = CliRunner().invoke(main, ["new-plugin", bad_name, "--dir", str(tmp_path)])
        assert bad.exit_code != 0 and "lower case words" in bad.output, bad_name
