"""Run one function in a fresh Python process, relaying its progress and its log records.

Training an adapter leaves a process slower at the next training (the glibc heap it
leaves behind: three identical trainings in one process took 84, 93 and 97 s) and
holding 3-4 GB it no longer uses. A training run in a child process starts fresh every
time, and what it used goes back to the system when it ends, for about 4 s of start-up.

The child is ``python -m memplug.runtime.child`` with the parent's import path; it does
not import the parent's ``__main__`` (as multiprocessing's spawn would), so a script
without an ``if __name__ == "__main__"`` guard is safe. Parent and child talk through
pickles on the child's stdin and stdout; what the child prints goes to its stderr.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import subprocess
import sys
import traceback
from collections.abc import Callable
from typing import Any

from ..errors import MemplugError

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int, dict[str, Any]], None]


class ChildFailed(MemplugError):
    """The child process ended without a result (killed, out of memory, or crashed)."""


def call(target: str, kwargs: dict[str, Any], progress: Progress | None = None, what: str = "") -> Any:
    """``module:function(**kwargs, progress=...)`` run in a child process; its return value.

    An exception the function raises is raised here, with the child's traceback as a note.
    ``progress`` (if given) is called here with what the child reports; its log records are
    handled here by the loggers of the same names. Interrupting the parent stops the child.
    """
    what = what or target
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    levels = {"": logging.getLogger().getEffectiveLevel(), "memplug": logging.getLogger("memplug").getEffectiveLevel()}
    proc = subprocess.Popen([sys.executable, "-m", "memplug.runtime.child"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        try:
            pickle.dump((target, kwargs, levels, progress is not None), proc.stdin)
            proc.stdin.close()
        except BrokenPipeError:
            pass  # the child died at start-up: its exit code says so below
        while True:
            try:
                kind, *body = pickle.load(proc.stdout)
            except EOFError:
                break
            if kind == "progress" and progress is not None:
                progress(*body)
            elif kind == "log":
                record = body[0]
                logging.getLogger(record.name).handle(record)
            elif kind == "result":
                proc.wait()
                return body[0]
            elif kind == "error":
                error, text = body
                proc.wait()
                if error is None:
                    raise MemplugError(f"{what} failed in its child process:\n{text}")
                error.add_note(f"raised in {what}'s child process:\n{text}")
                raise error
        code = proc.wait()
        why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        raise ChildFailed(f"{what}: its child process ended without a result ({why}"
                          f"{'; out of memory?' if code == -9 else ''}); see its output above")
    finally:
        if proc.poll() is None:  # the parent was interrupted, or a progress callback raised
            proc.kill()
            proc.wait()
        proc.stdout.close()


class _Forward(logging.Handler):
    def __init__(self, send: Callable[..., None]) -> None:
        super().__init__()
        self.send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            record.msg = record.getMessage()
            if record.exc_info:
                record.msg += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
            record.args, record.exc_info, record.exc_text = None, None, None
            self.send("log", record)
        except Exception:  # noqa: BLE001 - logging must never break the job
            self.handleError(record)


def _main() -> None:
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # what the job prints goes to stderr; stdout carries the messages

    def send(*message: Any) -> None:
        pickle.dump(message, out)
        out.flush()

    target, kwargs, levels, wants_progress = pickle.load(sys.stdin.buffer)
    root = logging.getLogger()
    root.handlers[:] = [_Forward(send)]
    root.setLevel(levels[""])
    logging.getLogger("memplug").setLevel(levels["memplug"])
    try:
        module, name = target.split(":")
        fn = getattr(importlib.import_module(module), name)
        if wants_progress:
            kwargs = {**kwargs, "progress": lambda *a: send("progress", *a)}
        result = fn(**kwargs)
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        text = "".join(traceback.format_exception(e)).rstrip()
        try:
            pickle.loads(pickle.dumps(e))
            send("error", e, text)
        except Exception:  # noqa: BLE001 - an exception that does not pickle goes back as text
            send("error", None, text)
        out.close()
        sys.exit(1)
    send("result", result)
    out.close()


if __name__ == "__main__":
    _main()
