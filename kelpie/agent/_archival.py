"""Archival memory: passages with tags, timestamps and embeddings, and exact vector search.

Each passage is a row `p/<seq>` (JSON: id, text, tags, time, the embedding's
model id) and its vector a row `v/<seq>` (float32 bytes), in the agent actor's
working memory, so a passage and its vector commit with the step that made
them; `pi/<id>` -> seq finds one by id.

Search is exact: the agent keeps an `ArchivalIndex` in memory (loaded on first
use) with one float32 matrix of unit vectors; a query applies the filters
(tags, time range) first, then scores every remaining passage with one matrix
product and takes the top k. Vectors made by a different embedding model than
the agent's are never compared with its queries: they are left out of the
index and counted (`stale`), and `reembed` replaces them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

import attrs
import numpy as np
import numpy.typing as npt

from kelpie.agent._errors import InvalidAgentRequest, PassageNotFound
from kelpie.runtime import ActorContext

TagMatch = Literal["any", "all"]

_PASSAGE = b"p/"
_VECTOR = b"v/"
_PASSAGE_ID = b"pi/"

#: The longest passage, in characters (a passage is one row of the store).
PASSAGE_MAX_CHARS = 64 * 1024
TOP_K_MAX = 100


def _key(prefix: bytes, seq: int) -> bytes:
    return prefix + seq.to_bytes(8, "big")


@attrs.frozen
class Passage:
    id: str
    seq: int
    text: str
    tags: tuple[str, ...] = ()
    created_at_ms: int = 0
    model_id: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "seq": self.seq,
            "text": self.text,
            "tags": list(self.tags),
            "at": self.created_at_ms,
            "model": self.model_id,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Passage:
        return cls(
            id=data["id"],
            seq=data["seq"],
            text=data["text"],
            tags=tuple(data.get("tags", ())),
            created_at_ms=data["at"],
            model_id=data.get("model", ""),
        )


def check_passage(text: object, tags: object) -> tuple[str, tuple[str, ...]]:
    if not isinstance(text, str) or not text.strip():
        raise InvalidAgentRequest("a passage's text must be a non-empty string")
    if len(text) > PASSAGE_MAX_CHARS:
        raise InvalidAgentRequest(
            f"a passage of {len(text)} characters is over the limit of {PASSAGE_MAX_CHARS}; "
            "split it into several passages"
        )
    if tags is None:
        tags = ()
    if not isinstance(tags, list | tuple) or not all(isinstance(t, str) and t for t in tags):
        raise InvalidAgentRequest(f"tags must be a list of non-empty strings, got {tags!r}")
    return text, tuple(dict.fromkeys(tags))


def as_matrix(vectors: Any, dimension: int) -> npt.NDArray[np.float32]:
    """Vectors from an embedder as unit rows of a float32 matrix."""
    matrix = np.asarray(vectors, dtype=np.float32)
    if matrix.ndim == 1:
        matrix = matrix.reshape(1, -1)
    if matrix.shape[1] != dimension:
        raise InvalidAgentRequest(
            f"the embedder returned vectors of dimension {matrix.shape[1]}, expected {dimension}"
        )
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    unit: npt.NDArray[np.float32] = (matrix / norms).astype(np.float32)
    return unit


class ArchivalIndex:
    """The agent's passages and vectors in memory, for exact search.

    Rows are appended as passages are added; the matrix, the time column and
    the tag -> rows lists are (re)built on the first search after a change.
    """

    def __init__(self, model_id: str, dimension: int) -> None:
        self.model_id = model_id
        self.dimension = dimension
        self._seqs: list[int] = []
        self._times: list[int] = []
        self._tags: list[tuple[str, ...]] = []
        self._rows: list[npt.NDArray[np.float32]] = []
        self._built: _Built | None = None
        #: Passages whose vector is another model's (not searchable until re-embedded).
        self.stale = 0

    def __len__(self) -> int:
        return len(self._seqs)

    @classmethod
    async def load(cls, ctx: ActorContext, model_id: str, dimension: int) -> ArchivalIndex:
        index = cls(model_id, dimension)
        passages = await ctx.kv_items(_PASSAGE)
        vectors = dict(await ctx.kv_items(_VECTOR))
        for key, value in passages:
            passage = Passage.from_json(json.loads(value))
            raw = vectors.get(_VECTOR + key[len(_PASSAGE) :])
            if passage.model_id != model_id or raw is None:
                index.stale += 1
                continue
            index.add(passage, np.frombuffer(raw, dtype=np.float32))
        return index

    def add(self, passage: Passage, vector: npt.NDArray[np.float32]) -> None:
        self._seqs.append(passage.seq)
        self._times.append(passage.created_at_ms)
        self._tags.append(passage.tags)
        self._rows.append(vector)
        self._built = None

    def remove(self, seq: int) -> None:
        if seq not in self._seqs:
            return
        at = self._seqs.index(seq)
        for column in (self._seqs, self._times, self._tags, self._rows):
            del column[at]
        self._built = None

    def _build(self) -> _Built:
        if self._built is None:
            by_tag: dict[str, list[int]] = {}
            for row, tags in enumerate(self._tags):
                for tag in tags:
                    by_tag.setdefault(tag, []).append(row)
            self._built = _Built(
                matrix=np.vstack(self._rows).astype(np.float32, copy=False),
                times=np.asarray(self._times, dtype=np.int64),
                by_tag={tag: np.asarray(rows, dtype=np.int64) for tag, rows in by_tag.items()},
            )
        return self._built

    def search(
        self,
        query: npt.NDArray[np.float32],
        *,
        top_k: int,
        tags: Sequence[str] = (),
        tag_match: TagMatch = "any",
        start_ms: int | None = None,
        end_ms: int | None = None,
    ) -> list[tuple[int, float]]:
        """(seq, cosine score) of the best `top_k` passages passing every filter, best first.

        The filters choose the candidates first; only candidates are ranked.
        """
        if not self._seqs:
            return []
        built = self._build()
        rows: npt.NDArray[np.int64] | None = None  # None: every row
        if tags:
            lists = [built.by_tag.get(tag, _NO_ROWS) for tag in dict.fromkeys(tags)]
            rows = lists[0]
            for more in lists[1:]:
                rows = (
                    np.intersect1d(rows, more, assume_unique=True)
                    if tag_match == "all"
                    else np.union1d(rows, more)
                )
        if start_ms is not None or end_ms is not None:
            times = built.times if rows is None else built.times[rows]
            keep = np.ones(len(times), dtype=bool)
            if start_ms is not None:
                keep &= times >= start_ms
            if end_ms is not None:
                keep &= times <= end_ms
            rows = np.flatnonzero(keep) if rows is None else rows[keep]
        if rows is None:
            scores = built.matrix @ query
        elif len(rows) * 4 < len(self._seqs):  # few candidates: score only those
            scores = built.matrix[rows] @ query
        else:  # many: one pass over the matrix beats copying the rows
            scores = (built.matrix @ query)[rows]
        count = len(scores)
        if count == 0:
            return []
        k = min(top_k, count)
        best = np.argpartition(scores, count - k)[count - k :] if k < count else np.arange(count)
        picked = [int(i) if rows is None else int(rows[i]) for i in best]
        ranked = sorted(
            zip(picked, best.tolist(), strict=True), key=lambda p: (-scores[p[1]], p[0])
        )
        return [(self._seqs[row], float(scores[i])) for row, i in ranked]


_NO_ROWS: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)


@attrs.frozen
class _Built:
    matrix: npt.NDArray[np.float32]
    times: npt.NDArray[np.int64]
    by_tag: dict[str, npt.NDArray[np.int64]]


def store_passage(ctx: ActorContext, passage: Passage, vector: npt.NDArray[np.float32]) -> None:
    ctx.kv_set(_key(_PASSAGE, passage.seq), json.dumps(passage.to_json()).encode())
    ctx.kv_set(_key(_VECTOR, passage.seq), vector.astype(np.float32).tobytes())
    ctx.kv_set(_PASSAGE_ID + passage.id.encode(), str(passage.seq).encode())


async def get_passage(ctx: ActorContext, passage_id: str) -> Passage:
    raw = await ctx.kv_get(_PASSAGE_ID + passage_id.encode())
    value = None if raw is None else await ctx.kv_get(_key(_PASSAGE, int(raw)))
    if value is None:
        raise PassageNotFound(f"no archival passage {passage_id!r} in this agent's memory")
    return Passage.from_json(json.loads(value))


async def passages_by_seq(ctx: ActorContext, seqs: Sequence[int]) -> list[Passage]:
    out = []
    for seq in seqs:
        value = await ctx.kv_get(_key(_PASSAGE, seq))
        if value is not None:
            out.append(Passage.from_json(json.loads(value)))
    return out


async def list_passages(
    ctx: ActorContext, *, after: str | None = None, limit: int = 50, ascending: bool = True
) -> list[Passage]:
    begin, end = 0, 2**63
    if after is not None:
        seq = (await get_passage(ctx, after)).seq
        if ascending:
            begin = seq + 1
        else:
            end = seq
    rows = await ctx.kv_range(
        _key(_PASSAGE, begin), _key(_PASSAGE, end), limit=limit, reverse=not ascending
    )
    return [Passage.from_json(json.loads(value)) for _, value in rows]


def delete_passage(ctx: ActorContext, passage: Passage) -> None:
    ctx.kv_delete(_key(_PASSAGE, passage.seq))
    ctx.kv_delete(_key(_VECTOR, passage.seq))
    ctx.kv_delete(_PASSAGE_ID + passage.id.encode())
