"""Canary for the trio private hooks (kelpie/sim/_trio_hooks.py).

If a trio upgrade moves the scheduler's private generator or the deterministic
flag, these tests fail loudly instead of letting simulations silently lose
determinism.
"""

from __future__ import annotations

import trio
import trio._core._run as trio_run

from kelpie.sim import _trio_hooks


def test_installed_trio_is_the_verified_version() -> None:
    """The hooks were verified on the installed trio, and its private names are still there."""
    assert _trio_hooks.check_hooks() == []


def test_every_batch_goes_through_the_orderer_in_spawn_order() -> None:
    """Trio hands each runnable batch, sorted by spawn order, to the installed orderer."""
    batches: list[list[str]] = []
    ran: list[int] = []

    def orderer(batch: list[trio.lowlevel.Task]) -> None:
        batches.append([task.name for task in batch])
        batch.reverse()  # trio pops from the end: reversed spawn order runs FIFO

    async def worker(index: int) -> None:
        ran.append(index)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for index in range(6):
                nursery.start_soon(worker, index, name=f"w{index}")

    with _trio_hooks.deterministic_scheduling(orderer):
        trio.run(main)
    workers = [b for b in batches if any(name.startswith("w") for name in b)]
    assert workers, "the orderer never saw the worker batch: trio no longer calls _r.shuffle"
    assert [name for name in workers[0] if name.startswith("w")] == [f"w{i}" for i in range(6)]
    assert ran == list(range(6))


def test_orderer_decides_the_run_order() -> None:
    """Whatever order the orderer leaves, trio runs the batch by popping from its end."""
    ran: list[int] = []

    def orderer(batch: list[trio.lowlevel.Task]) -> None:
        pass  # spawn order, popped from the end: the last spawned runs first

    async def worker(index: int) -> None:
        ran.append(index)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for index in range(4):
                nursery.start_soon(worker, index)

    with _trio_hooks.deterministic_scheduling(orderer):
        trio.run(main)
    assert ran == [3, 2, 1, 0]


def test_hooks_are_restored_after_the_run() -> None:
    """Leaving the block puts trio's own generator and flag back."""
    saved_r = trio_run._r
    saved_flag = trio_run._ALLOW_DETERMINISTIC_SCHEDULING
    with _trio_hooks.deterministic_scheduling(lambda batch: None):
        assert trio_run._r is not saved_r
        assert trio_run._ALLOW_DETERMINISTIC_SCHEDULING is True
    assert trio_run._r is saved_r
    assert saved_flag == trio_run._ALLOW_DETERMINISTIC_SCHEDULING


def test_thread_starters_exist() -> None:
    """The attributes the sanitizer patches to trap trio's worker threads exist."""
    for owner, name in _trio_hooks.thread_starters():
        assert callable(getattr(owner, name))


def test_nursery_children_are_reachable() -> None:
    """The last-resort cleanup of a dead run clears `Nursery._children`; it still exists."""

    async def main() -> bool:
        async with trio.open_nursery() as nursery:
            return isinstance(nursery._children, set)

    assert trio.run(main)
