"""memplug.runtime.child: a function run in a fresh process, its progress, logs and errors relayed."""

from __future__ import annotations

import logging
import os

import pytest

from memplug.errors import InvalidInput, MemplugError
from memplug.runtime import child


def test_a_child_returns_its_result_and_relays_progress_and_log_records(caplog):
    seen = []
    with caplog.at_level(logging.INFO, logger="memplug"):
        out = child.call("helpers.child_jobs:echo", {"value": [1, "two", 3.0]},
                         progress=lambda *a: seen.append(a))
    assert out["value"] == [1, "two", 3.0]
    assert out["pid"] != os.getpid()
    assert [(s, d, t) for s, d, t, _ in seen] == [("echo", 1, 3), ("echo", 2, 3), ("echo", 3, 3)]
    assert all(info["pid"] == out["pid"] for *_, info in seen)
    assert any(r.name == "memplug.test_child" and r.getMessage() == "echoing 3 items" for r in caplog.records)


def test_a_childs_exception_is_raised_in_the_parent_with_its_traceback():
    with pytest.raises(InvalidInput, match="no wings") as info:
        child.call("helpers.child_jobs:refuse", {"what": "wings"})
    assert any("child process" in n and "refuse" in n for n in info.value.__notes__)


def test_an_exception_that_does_not_pickle_comes_back_as_text():
    with pytest.raises(MemplugError, match=r"(?s)odd job failed in its child process.*Odd: 1 and 2"):
        child.call("helpers.child_jobs:odd", {}, what="odd job")


def test_a_killed_child_is_an_error_that_says_so():
    with pytest.raises(child.ChildFailed, match=r"ended without a result \(killed by signal 9; out of memory\?\)"):
        child.call("helpers.child_jobs:die", {}, what="doomed job")


def test_a_progress_callback_that_raises_stops_the_child():
    pids = []

    def stop(stage, done, total, info):
        pids.append(info["pid"])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        child.call("helpers.child_jobs:echo", {"value": []}, progress=stop)
    with pytest.raises(ProcessLookupError):  # stopped and reaped
        os.kill(pids[0], 0)


def test_output_on_fd_1_and_a_record_whose_extra_does_not_pickle_leave_the_messages_whole(caplog):
    with caplog.at_level(logging.WARNING, logger="memplug"):
        assert child.call("helpers.child_jobs:noisy", {}) == "fine"
    assert any(r.getMessage() == "with an extra that does not pickle" for r in caplog.records)


def test_a_childs_interrupt_is_an_error_here_and_an_unpicklable_result_its_pickling_error():
    with pytest.raises(MemplugError, match="(?s)failed in its child process.*KeyboardInterrupt"):
        child.call("helpers.child_jobs:interrupted", {})
    with pytest.raises(TypeError, match="cannot pickle") as info:  # the child's error, carried over
        child.call("helpers.child_jobs:unpicklable_result", {})
    assert any("child process" in n for n in info.value.__notes__)


def test_a_child_ends_when_its_parent_is_killed(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    pidfile = tmp_path / "child.pid"
    code = ("from memplug.runtime import child; "
            f"child.call('helpers.child_jobs:nap', {{'pidfile': {str(pidfile)!r}, 'seconds': 120}})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), *sys.path])}
    parent = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.monotonic() + 60
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline and parent.poll() is None, "the child never started"
        time.sleep(0.1)
    pid = int(pidfile.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while _running(pid):
        assert time.monotonic() < deadline, "the child outlived its parent"
        time.sleep(0.1)


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False
