"""Run one function in a fresh Python process, relaying its progress and its log records.

Training an adapter leaves a process slower at the next training (the glibc heap it
leaves behind: three identical trainings in one process took 86.9, 94.8 and 100.1 s)
and holding 3-4 GB it no longer uses. A training run in a child process starts fresh
every time, and what it used goes back to the system when it ends, for about 5 s of
start-up (``python -m benchmarks.lora_repeat``).

The child is ``python -P -c ...`` with the parent's import path. It does not import the
parent's ``__main__`` (as multiprocessing's spawn would), so a script without an
``if __name__ == "__main__"`` guard is safe. Parent and child talk through pickles on
the child's stdin and stdout; the child's own fd 1 is pointed at stderr before anything
is imported, so what it (or a C library) prints cannot get into the messages. The child
runs in a session of its own, so a terminal's Ctrl-C reaches the parent only (which
stops the child), and it ends when its stdin closes: when the parent goes, however it goes.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pickle
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

from ..errors import MemplugError

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int, dict[str, Any]], None]
# Seconds a child that has sent its result may take to exit before it is killed.
EXIT_GRACE_S = 30.0
_BOOT = "import os; fd = os.dup(1); os.dup2(2, 1); from memplug.runtime.child import _main; _main(fd)"


class ChildFailed(MemplugError):
    """The child process could not start, or ended without a result (killed, out of memory, crashed)."""


def available() -> str | None:
    """None if this interpreter can start a child; otherwise why not (a frozen or embedded app,
    whose ``sys.executable`` is not a Python that takes ``-c``)."""
    if getattr(sys, "frozen", False):
        return "this is a frozen application"
    if not sys.executable or not os.access(sys.executable, os.X_OK):
        return f"sys.executable ({sys.executable!r}) is not an executable Python"
    if not os.path.basename(sys.executable).lower().startswith(("python", "pypy")):
        return f"sys.executable ({sys.executable!r}) does not look like a Python interpreter"
    return None


def call(target: str, kwargs: dict[str, Any], progress: Progress | None = None, what: str = "") -> Any:
    """``module:function(**kwargs, progress=...)`` run in a child process; its return value.

    An exception the function raises is raised here, with the child's traceback as a note
    (or, if it cannot be carried over, a :class:`MemplugError` with that traceback as text).
    ``progress`` (if given) is called here with what the child reports. The child's log
    records are handled here by the loggers of the same names, where those are enabled.
    Interrupting the parent, or an exception from ``progress``, stops the child.
    """
    what = what or target
    why = available()
    if why is not None:
        raise ChildFailed(f"{what}: cannot start a child process: {why}")
    env = dict(os.environ)
    path = [os.getcwd() if p == "" else p for p in sys.path if isinstance(p, str)]
    env["PYTHONPATH"] = os.pathsep.join(path)
    try:
        proc = subprocess.Popen([sys.executable, "-P", "-c", _BOOT], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env=env, start_new_session=True)
    except OSError as e:
        raise ChildFailed(f"{what}: cannot start a child process ({sys.executable}): {e}") from e
    assert proc.stdin is not None and proc.stdout is not None
    try:
        try:
            # stdin stays open: the child ends when it closes (see _watch_parent).
            pickle.dump((target, kwargs, _levels(), progress is not None), proc.stdin)
            proc.stdin.flush()
        except BrokenPipeError:
            pass  # the child died at start-up: its exit code says so below
        while True:
            try:
                kind, *body = pickle.load(proc.stdout)
            except EOFError:
                break
            except Exception as e:  # a message cut short (the child was killed while writing) or garbled
                raise ChildFailed(f"{what}: unreadable message from its child process "
                                  f"({_ended(proc)}): {type(e).__name__}: {e}") from e
            if kind == "progress" and progress is not None:
                progress(*body)
            elif kind == "log":
                logger = logging.getLogger(body[0].name)
                if logger.isEnabledFor(body[0].levelno):
                    logger.handle(body[0])
            elif kind == "result":
                _reap(proc)
                return body[0]
            elif kind == "error":
                text, pickled = body
                _reap(proc)
                error = None
                with contextlib.suppress(Exception):
                    error = pickle.loads(pickled) if pickled is not None else None
                if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit: the child's, not ours
                    raise MemplugError(f"{what} failed in its child process:\n{text}")
                error.add_note(f"raised in {what}'s child process:\n{text}")
                raise error
        raise ChildFailed(f"{what}: its child process ended without a result ({_ended(proc)}); "
                          "its output is on stderr")
    finally:
        if proc.poll() is None:  # the parent was interrupted, or a progress callback raised
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()


def _reap(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.wait(timeout=EXIT_GRACE_S)
    except subprocess.TimeoutExpired:
        log.warning("child process %d did not exit %.0f s after its result; killed", proc.pid, EXIT_GRACE_S)
        proc.kill()
        proc.wait()


def _ended(proc: subprocess.Popen[bytes]) -> str:
    try:
        code = proc.wait(timeout=EXIT_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        return "still running; killed"
    if code < 0:
        return f"killed by signal {-code}" + ("; out of memory?" if code == -9 else "")
    return f"exit code {code}"


def _levels() -> dict[str, int]:
    """The levels the parent has set: the root's and every logger's that has one of its own."""
    levels = {"": logging.getLogger().getEffectiveLevel()}
    for name, logger in logging.root.manager.loggerDict.items():
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            levels[name] = logger.level
    return levels


class _Forward(logging.Handler):
    def __init__(self, send: Callable[..., None]) -> None:
        super().__init__()
        self.send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if record.exc_info:
                msg += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
            # A plain record: whatever ``extra=`` put on the original need not pickle.
            plain = logging.makeLogRecord({
                "name": record.name, "levelno": record.levelno, "levelname": record.levelname,
                "pathname": record.pathname, "filename": record.filename, "module": record.module,
                "lineno": record.lineno, "funcName": record.funcName, "created": record.created,
                "msecs": record.msecs, "relativeCreated": record.relativeCreated, "thread": record.thread,
                "threadName": record.threadName, "process": record.process, "processName": record.processName,
                "msg": msg, "args": None})
            self.send("log", plain)
        except Exception:  # noqa: BLE001 - logging must never break the job
            self.handleError(record)


def _watch_parent(stdin: Any) -> None:
    """End the child when its stdin closes: the parent is gone (or gave up on it)."""
    while stdin.read(1 << 16):
        pass
    os._exit(3)


def _main(fd: int) -> None:
    out = os.fdopen(fd, "wb")
    lock = threading.Lock()

    def send(*message: Any) -> None:
        data = pickle.dumps(message)  # whole, before a byte is written: a failure writes nothing
        with lock:
            out.write(data)
            out.flush()

    target, kwargs, levels, wants_progress = pickle.load(sys.stdin.buffer)
    threading.Thread(target=_watch_parent, args=(sys.stdin.buffer,), daemon=True).start()
    root = logging.getLogger()
    root.handlers[:] = [_Forward(send)]
    for name, level in levels.items():
        logging.getLogger(name or None).setLevel(level)
    code = 0
    try:
        module, name = target.split(":")
        fn = getattr(importlib.import_module(module), name)
        if wants_progress:
            kwargs = {**kwargs, "progress": lambda *a: send("progress", *a)}
        send("result", fn(**kwargs))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        code = 1
        text = "".join(traceback.format_exception(e)).rstrip()
        try:
            pickled = pickle.dumps(e)
        except Exception:  # noqa: BLE001 - an exception that does not pickle goes back as text
            pickled = None
        send("error", text, pickled)
    out.close()
    sys.stderr.flush()
    os._exit(code)  # no interpreter shutdown: nothing is left to do, and it could hang or take long
