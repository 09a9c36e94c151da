"""Functions the child-process tests run in a child (memplug.runtime.child imports them by name)."""

import logging
import os
import signal

from memplug.errors import InvalidInput

log = logging.getLogger("memplug.test_child")


def echo(value, progress=None):
    for step in range(3):
        if progress is not None:
            progress("echo", step + 1, 3, {"pid": os.getpid()})
    print("printed by the child")  # must not corrupt the messages on stdout
    log.info("echoing %d items", len(value))
    return {"value": value, "pid": os.getpid()}


def refuse(what):
    raise InvalidInput(f"no {what}")


class Odd(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")
        self.lock = __import__("threading").Lock()  # does not pickle


def odd():
    raise Odd(1, 2)


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def noisy(pidfile=None):
    os.write(1, b"written to fd 1 by C code\n")  # must land on stderr, not in the messages
    log.warning("with an extra that does not pickle", extra={"lock": __import__("threading").Lock()})
    return "fine"


def interrupted():
    raise KeyboardInterrupt


def unpicklable_result():
    return __import__("threading").Lock()


def nap(pidfile, seconds):
    with open(pidfile, "w") as f:
        f.write(str(os.getpid()))
    import time

    time.sleep(seconds)
