"""Child processes for the sqlite backend's multi-process and crash tests.

Run as `python _sqlite_child.py MODE PATH ...` (not collected by pytest):

- `increment PATH CHILD N SEED`: N `transact()` increments of the shared
  counters b"counter/a" and b"counter/b" and of this child's own counter, then
  prints "done".
- `load PATH ROUND TASKS SEED`: TASKS concurrent trio tasks commit transactions
  until the process is killed. Transaction number SEQ of task TASK increments the
  shared counter, writes the log entry (ROUND, TASK, SEQ) and sets the task's
  progress to SEQ + 1, all in one transaction, and prints
  "ack ROUND TASK SEQ" (flushed) only after `commit()` returned.
- `hold-lock PATH MS`: takes SQLite's write lock on the file with a plain sqlite3
  connection (BEGIN IMMEDIATE), prints "locked", holds it MS milliseconds, then
  rolls back.
"""

from __future__ import annotations

import sqlite3
import sys
import time

import trio

from kelpie.env import Rng
from kelpie.storage import RetryPolicy, SqliteStore, Transaction, pack, transact

#: Contended processes retry many times; the tests bound the whole run with a timeout.
PATIENT = RetryPolicy(attempts_max=100_000, backoff_initial_ms=1, backoff_max_ms=20)

#: The crash workload stops by itself after this many transactions per task.
LOAD_TRANSACTIONS_MAX = 100_000


def counter_key(name: str) -> bytes:
    return pack(("counter", name))


def log_key(round_: int, task: int, seq: int) -> bytes:
    return pack(("log", round_, task, seq))


def progress_key(round_: int, task: int) -> bytes:
    return pack(("progress", round_, task))


async def _add(tr: Transaction, key: bytes, amount: int) -> int:
    value = int(await tr.get(key) or b"0") + amount
    tr.set(key, str(value).encode())
    return value


async def increment(path: str, child: int, n: int, seed: int) -> None:
    rng = Rng(seed)

    async def one(tr: Transaction) -> None:
        await _add(tr, counter_key("a"), 1)
        await _add(tr, counter_key("b"), 1)
        await _add(tr, counter_key(f"child-{child}"), 1)

    async with await SqliteStore.open(path) as store:
        for _ in range(n):
            await transact(store, one, rng=rng, policy=PATIENT)
    print("done", flush=True)


async def load(path: str, round_: int, tasks: int, seed: int) -> None:
    async with await SqliteStore.open(path) as store:

        async def worker(task: int) -> None:
            rng = Rng(seed).fork(f"task-{task}")
            for seq in range(LOAD_TRANSACTIONS_MAX):

                async def one(tr: Transaction, seq: int = seq) -> None:
                    marker = log_key(round_, task, seq)
                    if await tr.get(marker) is not None:
                        return  # an earlier attempt committed (idempotent retry)
                    await _add(tr, counter_key("total"), 1)
                    tr.set(marker, b"1")
                    tr.set(progress_key(round_, task), str(seq + 1).encode())

                await transact(store, one, rng=rng, policy=PATIENT)
                print(f"ack {round_} {task} {seq}", flush=True)

        async with trio.open_nursery() as nursery:
            for task in range(tasks):
                nursery.start_soon(worker, task)


def hold_lock(path: str, ms: int) -> None:
    conn = sqlite3.connect(path, timeout=5, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        print("locked", flush=True)
        time.sleep(ms / 1000)
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def main(argv: list[str]) -> None:
    mode, path, *rest = argv
    numbers = [int(arg) for arg in rest]
    if mode == "increment":
        trio.run(increment, path, *numbers)
    elif mode == "load":
        trio.run(load, path, *numbers)
    elif mode == "hold-lock":
        hold_lock(path, *numbers)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
