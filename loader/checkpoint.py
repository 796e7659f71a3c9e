"""The standard GPT-2 parameter set every checkpoint format is read into.

Parameter names follow picoGPT: `wte`, `wpe`, `h.{i}.ln_1.g`, `h.{i}.attn.c_attn.w`, ..., `ln_f.b`.
Matrices are stored [n_in, n_out] (TF/Conv1D orientation), so `linear(x, w, b) = x @ w + b`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

HPARAM_KEYS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")
# How the weight matrices are stored: pgvector `vector` (fp32) or `halfvec` (fp16, half the bytes). Layer norms
# and biases stay fp32 either way.
DTYPES = ("float32", "float16")


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable, or inconsistent; the message says which and why."""


class LazyParams(Mapping[str, np.ndarray]):
    """A checkpoint's tensors, each read from its file when asked for and not kept: `gpt-sql load` then holds one
    tensor at a time (a layer's matrix, or the embeddings) instead of the whole checkpoint. Names and shapes are
    known, and checked, without reading; values are checked (finite) as each tensor is read. `read(name)` returns a
    new array on every call, which the caller owns (as_dtype rounds it in place)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], read: Callable[[str], np.ndarray], source: str,
                 check: bool = True) -> None:
        self.shapes = shapes
        self._read = read
        self.source = source
        self._check = check

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.shapes:
            raise KeyError(name)
        a = np.ascontiguousarray(self._read(name), dtype=np.float32).reshape(self.shapes[name])
        if self._check and not np.all(np.isfinite(a)):
            raise CheckpointError(f"{self.source}: tensor {name} holds NaN or infinite values")
        return a

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def mapped(self, f: Callable[[str, np.ndarray], np.ndarray]) -> LazyParams:
        """The same tensors passed through `f(name, tensor)` as each is read (values already checked)."""
        return LazyParams(self.shapes, lambda name: f(name, self[name]), self.source, check=False)


@dataclass
class Checkpoint:
    hparams: dict[str, int]
    encoder: dict[str, int]  # token string in GPT-2's byte-to-unicode alphabet -> token id
    merges: list[tuple[str, str]]  # BPE merges in rank order
    # float32, names from param_shapes(): a dict (read whole), or LazyParams (open_checkpoint: read as used)
    params: Mapping[str, np.ndarray] = field(repr=False)
    source: str = ""  # where it came from, shown by `gpt-sql models`
    dtype: str = "float32"  # one of DTYPES; for float16 the matrices hold fp16 values (still as float32 arrays)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        if isinstance(self.params, LazyParams):
            return self.params.shapes
        return {name: tuple(np.shape(a)) for name, a in self.params.items()}

    @property
    def n_params(self) -> int:
        return sum(int(np.prod(shape, dtype=np.int64)) for shape in self.shapes.values())


def param_shapes(hp: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Every parameter GPT-2 has, with the shape hparams imply."""
    d, v, c = hp["n_embd"], hp["n_vocab"], hp["n_ctx"]
    shapes: dict[str, tuple[int, ...]] = {"wte": (v, d), "wpe": (c, d)}
    for i in range(hp["n_layer"]):
        p = f"h.{i}."
        shapes.update({
            p + "ln_1.g": (d,), p + "ln_1.b": (d,),
            p + "attn.c_attn.w": (d, 3 * d), p + "attn.c_attn.b": (3 * d,),
            p + "attn.c_proj.w": (d, d), p + "attn.c_proj.b": (d,),
            p + "ln_2.g": (d,), p + "ln_2.b": (d,),
            p + "mlp.c_fc.w": (d, 4 * d), p + "mlp.c_fc.b": (4 * d,),
            p + "mlp.c_proj.w": (4 * d, d), p + "mlp.c_proj.b": (d,),
        })
    shapes["ln_f.g"] = (d,)
    shapes["ln_f.b"] = (d,)
    return shapes


def is_matrix(name: str) -> bool:
    """The parameters stored in the weight dtype: the embeddings and the four matrices of each block."""
    return name in ("wte", "wpe") or name.endswith(".w")


def as_dtype(ckpt: Checkpoint, dtype: str) -> Checkpoint:
    """The checkpoint with its matrices rounded to `dtype` (to nearest, as pgvector's cast to halfvec does). A lazy
    checkpoint stays lazy: each matrix is rounded (and range-checked) as it is read."""
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == ckpt.dtype or dtype == "float32":
        return ckpt if dtype == ckpt.dtype else replace(ckpt, dtype=dtype)

    def rounded(name: str, a: np.ndarray, in_place: bool = False) -> np.ndarray:
        if not is_matrix(name):
            return a
        if max(a.max(initial=0), -a.min(initial=0)) > np.finfo(np.float16).max:  # np.abs would copy a
            raise CheckpointError(f"{ckpt.source}: {name} holds values beyond float16's range (65504)")
        if not in_place:
            return a.astype(np.float16).astype(np.float32)
        np.copyto(a, a.astype(np.float16))  # no second float32 copy of the embeddings beside the first
        return a

    if isinstance(ckpt.params, LazyParams):  # each tensor read afresh: ours to round in place
        return replace(ckpt, params=ckpt.params.mapped(lambda name, a: rounded(name, a, in_place=True)), dtype=dtype)
    return replace(ckpt, params={k: rounded(k, a) for k, a in ckpt.params.items()}, dtype=dtype)


def validate(ckpt: Checkpoint) -> Checkpoint:
    """Check hparams, tokenizer and every tensor against each other; raise CheckpointError on the first mismatch.
    A lazy checkpoint's tensors are checked by shape here, and by value as they are read."""
    hp = ckpt.hparams
    missing = [k for k in HPARAM_KEYS if k not in hp]
    if missing:
        raise CheckpointError(f"{ckpt.source}: hparams lack {', '.join(missing)}")
    for k in HPARAM_KEYS:
        if not isinstance(hp[k], int) or hp[k] <= 0:
            raise CheckpointError(f"{ckpt.source}: hparam {k} must be a positive integer, got {hp[k]!r}")
    if hp["n_embd"] % hp["n_head"]:
        raise CheckpointError(f"{ckpt.source}: n_embd {hp['n_embd']} is not a multiple of n_head {hp['n_head']}")
    if len(ckpt.encoder) != hp["n_vocab"]:
        raise CheckpointError(
            f"{ckpt.source}: the tokenizer has {len(ckpt.encoder)} tokens but n_vocab is {hp['n_vocab']}")
    if sorted(ckpt.encoder.values()) != list(range(hp["n_vocab"])):
        raise CheckpointError(f"{ckpt.source}: token ids are not exactly 0..n_vocab-1")
    shapes, have = param_shapes(hp), ckpt.shapes
    for name, shape in shapes.items():
        if name not in have:
            raise CheckpointError(f"{ckpt.source}: tensor {name} is missing")
        if have[name] != shape:
            raise CheckpointError(f"{ckpt.source}: tensor {name} has shape {have[name]}, hparams imply {shape}")
    extra = set(have) - set(shapes)
    if extra:
        raise CheckpointError(f"{ckpt.source}: unexpected tensors {sorted(extra)[:5]}")
    if isinstance(ckpt.params, LazyParams):
        return ckpt
    for name in shapes:
        a = ckpt.params[name]
        if not np.all(np.isfinite(a)):
            raise CheckpointError(f"{ckpt.source}: tensor {name} holds NaN or infinite values")
        ckpt.params[name] = np.ascontiguousarray(a, dtype=np.float32)  # type: ignore[index]
    return ckpt


def read_hparams(path: str | Path) -> dict[str, int] | None:
    """A checkpoint directory's hparams alone (cheap: no tensors read), or None if it is not recognisably one."""
    p = Path(path).expanduser()
    if (p / "hparams.json").is_file():
        from .openai_format import _read_hparams as read_openai_hparams
        return read_openai_hparams(p / "hparams.json")
    if (p / "config.json").is_file():
        from .hf_format import _read_hparams as read_hf_hparams
        return read_hf_hparams(p / "config.json")
    return None


WAL_ROOM = 2**30  # the embedded server's max_wal_size (PostgreSQL's default): the WAL a load may leave on disk


def count_params(hp: dict[str, int]) -> int:
    """GPT-2's parameter count from its hparams (param_shapes summed, without listing them)."""
    d, n_layer = hp["n_embd"], hp["n_layer"]
    return (hp["n_vocab"] + hp["n_ctx"]) * d + n_layer * (12 * d * d + 13 * d) + 2 * d


def room_needed(hp: dict[str, int], dtype: str) -> tuple[int, int]:
    """(memory to load the checkpoint, disk the load takes in the database), in bytes, estimated from its shapes.

    Memory: the loader holds one tensor at a time (open_checkpoint), so the largest one (the token embeddings, or
    a layer's MLP matrix) as float32, as much again for its temporaries (the file's own dtype, the finiteness
    check, fp16 rounding), and 128 MB for the program. Disk: a table row holds one output column, and rows that
    do not share a page leave the rest of it empty; the load also writes as much WAL, of which PostgreSQL keeps
    up to max_wal_size (1 GB) until its next checkpoint."""
    d = hp["n_embd"]
    largest = max(hp["n_vocab"] * d, hp["n_ctx"] * d, 4 * d * d)
    memory = 2 * largest * 4 + 128 * 2**20
    weight = 2 if dtype == "float16" else 4
    row = d * weight + 8 + 32  # the vector, its header, the tuple header and the row's other columns
    rows_per_page = max(1, 8160 // (row + 4))
    tables = count_params(hp) * weight * 8192 // (rows_per_page * d * weight)
    return memory, tables + min(tables, WAL_ROOM)


def check_room(hp: dict[str, int], dtype: str, free_memory: int, free_disk: int | None) -> None:
    """Refuse, before reading any tensor, a load this machine has no room for (free_disk None: not ours to
    know, e.g. a remote server): one line, rather than an out-of-memory kill or a full disk half-way."""
    memory, disk = room_needed(hp, dtype)
    gb = 2**30
    if free_disk is not None and disk > free_disk:
        raise CheckpointError(f"loading this model takes about {disk / gb:.1f} GB of disk in the database ({dtype}: "
                              f"its tables and the WAL written meanwhile); {free_disk / gb:.1f} GB is free there")
    if memory > free_memory:
        raise CheckpointError(f"loading this model needs about {memory / gb:.1f} GB of memory ({dtype}); "
                              f"{free_memory / gb:.1f} GB is available")


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read an OpenAI (TF) or Hugging Face GPT-2 checkpoint directory whole (every tensor in memory)."""
    ckpt = open_checkpoint(path)
    return replace(ckpt, params={name: ckpt.params[name] for name in ckpt.params})


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open an OpenAI (TF) or Hugging Face GPT-2 checkpoint directory, detected by its files: hparams, tokenizer
    and every tensor's shape are read and checked now, the tensors themselves only when used (LazyParams)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if not p.is_dir():
        raise CheckpointError(f"{p}: expected a checkpoint directory")
    if (p / "hparams.json").exists():
        from .openai_format import open_openai
        return validate(open_openai(p))
    if (p / "config.json").exists():
        from .hf_format import open_hf
        return validate(open_hf(p))
    raise CheckpointError(
        f"{p}: not a GPT-2 checkpoint (expected hparams.json + model.ckpt.* from OpenAI, "
        "or config.json + model.safetensors from Hugging Face)")
