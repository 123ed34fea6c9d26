"""The workload of tests/storage/test_postgres_crash.py, run in a child process that gets killed.

Usage: python _pg_crash_child.py URL TABLE SEED TASKS

TASKS concurrent trio tasks commit transactions to a PostgresStore until the
process dies. Each transaction increments one of SLOTS counters and writes a log
entry under a unique id naming that slot, so that a transaction applied by half
is visible as a counter that differs from the number of its log entries. The
log entry is also the transaction's marker: an attempt that finds it returns at
once, which makes the retries of `transact()` (after CommitUnknownResult)
idempotent. "ack <id>" is printed, and flushed, only after `commit()` returned.
"""

from __future__ import annotations

import sys

import trio

from kelpie.env import Rng
from kelpie.storage import RetryPolicy, Transaction, transact
from kelpie.storage._postgres import PostgresStore

#: How many counters the transactions spread over (few, so that they conflict).
SLOTS = 4


def counter_key(slot: int) -> bytes:
    return b"c/%d" % slot


def log_key(txn_id: str) -> bytes:
    return b"l/" + txn_id.encode()


async def worker(store: PostgresStore, rng: Rng, task: int) -> None:
    policy = RetryPolicy(attempts_max=1_000, backoff_initial_ms=1, backoff_max_ms=50)
    for seq in range(1_000_000):
        txn_id = f"{task}-{seq}"
        slot = rng.randrange(SLOTS)

        async def body(tr: Transaction, txn_id: str = txn_id, slot: int = slot) -> None:
            if await tr.get(log_key(txn_id)) is not None:
                return  # an earlier attempt committed
            count = int(await tr.get(counter_key(slot)) or b"0")
            tr.set(counter_key(slot), b"%d" % (count + 1))
            tr.set(log_key(txn_id), b"%d" % slot)

        await transact(store, body, rng=rng, policy=policy)
        sys.stdout.write(f"ack {txn_id}\n")
        sys.stdout.flush()


async def main(url: str, table: str, seed: int, tasks: int) -> None:
    store = await PostgresStore.open(url, pool_size=tasks, table=table)
    rng = Rng(seed)
    async with trio.open_nursery() as nursery:
        for task in range(tasks):
            nursery.start_soon(worker, store, rng.fork(f"task-{task}"), task)


if __name__ == "__main__":
    url_arg, table_arg, seed_arg, tasks_arg = sys.argv[1:]
    trio.run(main, url_arg, table_arg, int(seed_arg), int(tasks_arg))
