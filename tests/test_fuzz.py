"""The API fuzzer (memplug.testing.fuzz, `memplug fuzz`) runs for a set time and reports what it tried."""

from __future__ import annotations

import json

from click.testing import CliRunner

from memplug import MemplugError, hookimpl
from memplug.cli import main
from memplug.testing.fuzz import APIS, run


def test_a_short_run_finds_nothing_and_reports_what_it_tried(memory, user, tmp_path):
    memory.write(user, "Load the tokenizer and the embedder before the clock starts.")
    out = tmp_path / "fuzz.json"
    report = run(memory, seconds=6, seed=11, out=out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report, default=str))
    assert report["findings"] == [], report["findings"]
    assert report["calls"] >= 30 and set(report["per_api"]) == set(APIS)
    tried = [api for api, outcomes in report["per_api"].items() if outcomes]
    assert len(tried) >= 6
    assert sum(c.get("ok", 0) for c in report["per_api"].values()) > 0  # not everything is refused
    assert any(k not in ("ok", "finding") for c in report["per_api"].values() for k in c)  # nor accepted
    assert all(memory.stats(user)["items"] == 0 for user in report["users"])  # it cleans up after itself


class BrokenReads:
    """A tier that fails with a bare exception on some reads: the fuzzer must report it."""

    name = "broken"
    level = 1

    @hookimpl
    def memplug_read(self, query):
        if any(c in query for c in "aeiou"):
            raise KeyError("a tier forgot to wrap this")
        return None


class RefusesAfterWriting:
    """A tier that refuses a write with a MemplugError after rows were inserted: a half-write."""

    name = "halfwrite"
    level = 1

    @hookimpl
    def memplug_write(self, items):
        if any("o" in it.text for it in items):
            raise MemplugError("refused too late")  # the host's transaction rolls back: no finding
        return None


def test_a_bare_exception_is_a_finding(make_memory, tmp_path):
    mem = make_memory(plugins=[BrokenReads(), RefusesAfterWriting()])
    report = run(mem, seconds=6, seed=3, out=tmp_path / "fuzz.json")
    kinds = {(f["api"], f["what"].split(":")[0]) for f in report["findings"]}
    assert ("read", "KeyError") in kinds
    read = next(f for f in report["findings"] if f["api"] == "read")
    assert "query=" in read["input"] and any("KeyError" in line for line in read["traceback"])
    assert not any(f["api"] in ("write", "write_batch") for f in report["findings"])  # rolled back, not half-written


def test_command_line(dsn, tmp_path):
    out = tmp_path / "fuzz.json"
    result = CliRunner().invoke(main, ["fuzz", "--seconds", "3", "--seed", "5", "--dsn", dsn, "--out", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "0 finding(s)" in result.output
    assert json.loads(out.read_text())["seed"] == 5
