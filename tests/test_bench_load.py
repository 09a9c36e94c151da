"""The load benchmark, briefly: two processes for three seconds against the session's Postgres."""

from __future__ import annotations

import json

from memplug.checks.load import KINDS, run


def test_load_benchmark_runs_clean_and_reports_every_kind(dsn, tmp_path):
    result = run(processes=2, seconds=3.0, out_dir=tmp_path, dsn=dsn, console=None)
    saved = json.loads((tmp_path / "load.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert result["errors"] == 0, result["error_samples"]
    assert result["deadlocks"] == 0
    assert result["settings"]["processes"] == 2 and result["machine"]["postgres"]
    assert set(result["per_kind"]) == set(KINDS)
    assert result["ops"] == sum(k["ops"] for k in result["per_kind"].values()) > 0
    for kind in ("write", "read"):
        row = result["per_kind"][kind]
        assert row["ops"] > 0 and 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"] <= row["max_ms"]
    assert len(result["ops_per_second_timeline"]) == 3
    # The run's users are forgotten: nothing is left in a database that outlives it.
    from memplug import Memory

    with Memory(dsn) as mem, mem.store.transaction() as db:
        assert db.execute("SELECT count(*) FROM items WHERE user_id LIKE 'load-%'").fetchone()[0] == 0


def test_load_benchmark_over_http_compares_both_paths_in_one_run(dsn, tmp_path):
    result = run(processes=2, seconds=3.0, out_dir=tmp_path, dsn=dsn, console=None, http=True, server_workers=1,
                 alone_reads=20)
    saved = json.loads((tmp_path / "load_http.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert result["errors"] == 0, (result["library"]["error_samples"], result["http"]["error_samples"])
    assert result["settings"]["server_workers"] == 1 and result["machine"]["cpu_model"]
    for path in ("library", "http"):
        for kind in KINDS:
            row = result[path]["per_kind"][kind]
            assert row["ops"] > 0 and 0 < row["p50_ms"] <= row["p95_ms"], (path, kind)
    for kind in ("read", "write", "all_reads"):
        extra = result["http_overhead"][kind]
        # The server's own time is inside the client's: what is left is the HTTP path.
        assert 0 < extra["p50_ms"] <= extra["p95_ms"] < 1000, (kind, extra)
        assert 0 <= extra["server_p50_ms"] < extra["p50_ms"] and extra["transit_p50_ms"] > 0, (kind, extra)
    alone = result["one_client"]
    assert alone["reads"] == 20 and 0 < alone["overhead"]["p50_ms"] < alone["http"]["p50_ms"]
    from memplug import Memory

    with Memory(dsn) as mem, mem.store.transaction() as db:  # both runs' users are forgotten
        assert db.execute("SELECT count(*) FROM items WHERE user_id LIKE 'load-%'").fetchone()[0] == 0
