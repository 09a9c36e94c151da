"""A writer process for the crash tests: it writes batches until it is stopped, logging each acknowledged one.

    python -m helpers.batch_writer ACK_LOG USER BATCH

Batch n is BATCH texts written by one ``Memory.write`` call with metadata ``{"batch": n}``. When the call
returns, one JSON line ``{"batch": n, "ids": [...], "s": seconds}`` is appended to ACK_LOG and flushed: a batch
in the log was acknowledged. The store comes from the environment (MEMPLUG_DSN, or the embedded server under
MEMPLUG_HOME). If the store goes away the writer prints the error and exits with status 3 at once.
"""

import json
import os
import sys
import time

from memplug import Memory, MemplugError


def main() -> None:
    log_path, user, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with Memory(options={"pool_size": 2}) as mem, open(log_path, "a") as log:
        mem.embedder.encode(["load the embedder before the first batch"])
        n = 0
        while True:
            texts = [f"Crash test batch {n}, note {k}: parcel {n * size + k} left the depot." for k in range(size)]
            started = time.monotonic()
            try:
                items = mem.write(user, texts, {"batch": n})
            except MemplugError as e:
                print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
                # Exit now, as a crashed app would: the embedded server's exit hook would wait for a dead server.
                os._exit(3)
            log.write(json.dumps({"batch": n, "ids": [it.id for it in items],
                                  "s": round(time.monotonic() - started, 4)}) + "\n")
            log.flush()
            n += 1


if __name__ == "__main__":
    main()
