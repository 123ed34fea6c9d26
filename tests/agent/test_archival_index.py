"""Exact archival search: the index agrees with a brute-force reference under every filter."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kelpie.agent._archival import ArchivalIndex, Passage

TAGS = ["a", "b", "c", "d"]


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    count=st.integers(1, 60),
    removed=st.lists(st.integers(0, 59), max_size=10),
    tags=st.lists(st.sampled_from(TAGS), max_size=3),
    mode=st.sampled_from(["any", "all"]),
    start=st.none() | st.integers(0, 60),
    end=st.none() | st.integers(0, 60),
    top_k=st.integers(1, 70),
)
def test_search_matches_brute_force(
    seed: int,
    count: int,
    removed: list[int],
    tags: list[str],
    mode: str,
    start: int | None,
    end: int | None,
    top_k: int,
) -> None:
    rng = np.random.default_rng(seed)
    index = ArchivalIndex("m", 8)
    vectors = rng.standard_normal((count, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    passages = []
    for i in range(count):
        mine = tuple(t for t in TAGS if rng.random() < 0.4)
        passages.append(Passage(f"p{i}", i, "t", mine, created_at_ms=i, model_id="m"))
        index.add(passages[-1], vectors[i])
    gone = {r for r in removed if r < count}
    for seq in gone:
        index.remove(seq)
    query = rng.standard_normal(8).astype(np.float32)

    def passes(p: Passage) -> bool:
        if tags:
            hits = [t in p.tags for t in tags]
            if not (all(hits) if mode == "all" else any(hits)):
                return False
        if start is not None and p.created_at_ms < start:
            return False
        return end is None or p.created_at_ms <= end

    expected = sorted(
        (
            (p.seq, float(vectors[p.seq] @ query))
            for p in passages
            if p.seq not in gone and passes(p)
        ),
        key=lambda pair: (-pair[1], pair[0]),
    )[:top_k]
    got = index.search(
        query,
        top_k=top_k,
        tags=tags,
        tag_match=mode,
        start_ms=start,
        end_ms=end,  # type: ignore[arg-type]
    )
    assert [seq for seq, _ in got] == [seq for seq, _ in expected]
    assert np.allclose([s for _, s in got], [s for _, s in expected], atol=1e-5)
