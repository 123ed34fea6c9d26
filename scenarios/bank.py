"""Bank transfers on Kelpie's store under every storage fault and worker crashes.

Accounts start with equal balances. Workers on three nodes each make a planned
list of transfers; each transfer is one transaction that moves an amount between
two accounts and writes a marker keyed by the transfer's id, and that first
reads the marker and does nothing if it is already there. That is what makes a
transfer safe to retry after `CommitUnknownResult` (the first attempt may have
committed) and after a crash.

A crasher cancels workers at random moments (the worker's in-memory state
vanishes, exactly a crashed process); the worker restarts after a pause and
makes the transfer it was in the middle of again, under the same id. An auditor
keeps reading every balance in one transaction.

Invariants:
- every committed audit sees the initial total;
- after the run: the total is conserved, and each balance equals its initial
  value plus the effect of exactly the transfers whose markers exist (a
  transfer applied twice, or half applied, breaks this);
- every transfer a worker saw acknowledged has its marker;
- the store's committed history is serializable in commit order.
"""

from __future__ import annotations

import trio

from kelpie.sim import (
    CheckFailed,
    FaultConfig,
    Scenario,
    SimContext,
    SimStore,
    StorageFaults,
    Workload,
)
from kelpie.storage import (
    RetryPolicy,
    StorageError,
    Transaction,
    pack,
    transact,
    tuple_range,
    unpack,
)

INITIAL_BALANCE = 100
RETRY = RetryPolicy(attempts_max=30, backoff_initial_ms=1, backoff_max_ms=50)


def _account(i: int) -> bytes:
    return pack(("bank", "account", i))


def _marker(transfer_id: str) -> bytes:
    return pack(("bank", "transfer", transfer_id))


class BankWorkload(Workload):
    def __init__(self, *, idempotent: bool = True, check_conflicts: bool = True) -> None:
        #: False plants a bug: transfers skip their marker check, so retries apply twice.
        self.idempotent = idempotent
        self.check_conflicts = check_conflicts

    async def setup(self, ctx: SimContext) -> None:
        rng = ctx.rng
        self.accounts = rng.randint(3, 8)
        self.workers = rng.randint(2, 6)
        self.transfers_per_worker = rng.randint(5, 25)
        self.crash_rate_per_s = rng.choice([0.0, 2.0, 10.0])
        if self.check_conflicts:
            self.store = ctx.store
        else:  # a planted bug, for the tests that show this scenario catches it
            self.store = SimStore(ctx.rng.fork("broken-store"), check_conflicts=False)

        async def init(tr: Transaction) -> None:
            for i in range(self.accounts):
                tr.set(_account(i), pack((INITIAL_BALANCE,)))

        await transact(self.store, init, rng=rng.fork("init"), policy=RetryPolicy(100))
        self.acked: set[str] = set()
        self.crashes = 0
        self.gave_up = 0
        self.audits = 0
        self.scopes: dict[int, trio.CancelScope] = {}
        self.done = False

    def plan(self, ctx: SimContext, wid: int) -> list[tuple[str, int, int, int]]:
        rng = ctx.rng.fork(f"plan:{wid}")
        plan = []
        for j in range(self.transfers_per_worker):
            src, dst = rng.sample(range(self.accounts), 2)
            plan.append((f"w{wid}-t{j}", src, dst, rng.randint(1, 60)))
        return plan

    async def transfer(self, tr: Transaction, tid: str, src: int, dst: int, amount: int) -> str:
        marker = _marker(tid)
        if self.idempotent and await tr.get(marker) is not None:
            return "already applied"
        src_balance = unpack((await tr.get(_account(src))) or b"")[0]
        dst_balance = unpack((await tr.get(_account(dst))) or b"")[0]
        if src_balance < amount:
            tr.set(marker, pack(("declined",)))
            return "declined"
        tr.set(_account(src), pack((src_balance - amount,)))
        tr.set(_account(dst), pack((dst_balance + amount,)))
        tr.set(marker, pack(("applied", src, dst, amount)))
        return "applied"

    async def worker(self, ctx: SimContext, wid: int) -> None:
        node = ctx.nodes[wid % len(ctx.nodes)]
        for tid, src, dst, amount in self.plan(ctx, wid):
            while True:  # until the transfer is acknowledged or given up
                with trio.CancelScope() as scope:
                    self.scopes[wid] = scope
                    try:
                        outcome = await transact(
                            self.store,
                            lambda tr, t=tid, s=src, d=dst, a=amount: self.transfer(tr, t, s, d, a),
                            rng=node.env.rng,
                            policy=RETRY,
                        )
                    except StorageError as exc:
                        # The outcome is unknown or the store was down for too long; the
                        # transfer may have committed. Its marker, if any, tells the check.
                        self.gave_up += 1
                        ctx.emit("bank.gave_up", transfer=tid, error=type(exc).__name__)
                        break
                    self.acked.add(tid)
                    ctx.emit("bank.ack", transfer=tid, outcome=outcome)
                    break
                del self.scopes[wid]
                # Crashed: everything in memory is gone; restart and redo the transfer.
                self.crashes += 1
                ctx.emit("bank.crash", worker=wid, transfer=tid)
                await trio.sleep(ctx.rng.uniform(0.001, 0.05))
            self.scopes.pop(wid, None)

    async def crasher(self, ctx: SimContext) -> None:
        rng = ctx.rng.fork("crasher")
        while not self.done and self.crash_rate_per_s:
            await trio.sleep(rng.expovariate(self.crash_rate_per_s))
            live = sorted(self.scopes)
            if live:
                self.scopes[rng.choice(live)].cancel()

    async def auditor(self, ctx: SimContext) -> None:
        while not self.done:
            try:
                async with self.store.transaction() as tr:
                    rows = await tr.get_range(*tuple_range(("bank", "account")))
                    await tr.commit()
            except StorageError:
                await trio.sleep(0.002)
                continue
            total = sum(unpack(v)[0] for _, v in rows)
            if total != self.accounts * INITIAL_BALANCE:
                raise CheckFailed(f"an audit saw a total of {total}, not {self.accounts * 100}")
            self.audits += 1
            await trio.sleep(0.005)

    async def run(self, ctx: SimContext) -> None:
        async with trio.open_nursery() as background:
            ctx.spawn(background, self.auditor, ctx, name="auditor")
            ctx.spawn(background, self.crasher, ctx, name="crasher")
            async with trio.open_nursery() as workers:
                for wid in range(self.workers):
                    node = ctx.nodes[wid % len(ctx.nodes)]
                    ctx.spawn(workers, self.worker, ctx, wid, node=node, name=f"worker-{wid}")
            self.done = True

    async def check(self, ctx: SimContext) -> None:
        state = self.store.snapshot()
        balances = {
            unpack(k)[2]: unpack(v)[0]
            for k, v in state.items()
            if k.startswith(pack(("bank", "account")))
        }
        expected = dict.fromkeys(range(self.accounts), INITIAL_BALANCE)
        markers = {unpack(k)[2]: unpack(v) for k, v in state.items() if unpack(k)[1] == "transfer"}
        for marker in markers.values():
            if marker[0] == "applied":
                _, src, dst, amount = marker
                expected[src] -= amount
                expected[dst] += amount
        if sum(balances.values()) != self.accounts * INITIAL_BALANCE:
            raise CheckFailed(f"the total is {sum(balances.values())}, not conserved")
        if balances != expected:
            raise CheckFailed(
                f"balances {balances} are not the initial ones plus the transfers marked "
                f"applied ({expected}): a transfer was applied twice or in part"
            )
        missing = sorted(self.acked - set(markers))
        if missing:
            raise CheckFailed(f"acknowledged transfers have no marker: {missing[:5]}")
        error = self.store.check_history()
        if error:
            raise CheckFailed(f"the committed history is not serializable: {error}")
        ctx.emit(
            "bank.summary",
            acked=len(self.acked),
            applied=sum(1 for m in markers.values() if m[0] == "applied"),
            crashes=self.crashes,
            gave_up=self.gave_up,
            audits=self.audits,
            faults=sorted(self.store.injected.items()),
        )


SCENARIOS = (
    Scenario(
        name="bank",
        summary="bank transfers with idempotency markers: every storage fault, worker crashes",
        nodes=3,
        faults=FaultConfig(storage=StorageFaults.every()),
        workload=BankWorkload,
        max_time_s=600.0,
    ),
)
