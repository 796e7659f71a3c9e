"""OpenAI's GPT-2 checkpoint directory: hparams.json, encoder.json, vocab.bpe and a TensorFlow checkpoint.

The TensorFlow checkpoint is read without TensorFlow. A V2 checkpoint ("tensor bundle") is
`PREFIX.index`, a LevelDB-style sorted table mapping tensor names to serialized `BundleEntryProto`s,
plus `PREFIX.data-SSSSS-of-NNNNN` shards holding the raw little-endian tensor bytes.
Writing (`write_openai`, for tests) does use TensorFlow, so the reader is checked against the real thing.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .checkpoint import HPARAM_KEYS, Checkpoint, CheckpointError, LazyParams, param_shapes

TABLE_MAGIC = 0xDB4775248B80FB57  # LevelDB's kTableMagicNumber, shared by TF's table format
FOOTER_SIZE = 48  # two BlockHandles padded to 40 bytes + 8-byte magic
BLOCK_TRAILER_SIZE = 5  # compression type byte + masked crc32c
DT_FLOAT = 1
DTYPE_NAMES = {1: "float32", 2: "float64", 3: "int32", 9: "int64", 14: "bfloat16", 19: "float16"}
REDOWNLOAD = "re-download the checkpoint (e.g. `gpt-sql download 124M`)"


class _Corrupt(Exception):
    """Malformed index bytes; turned into a CheckpointError naming the file at the public boundary."""


# --- crc32c (Castagnoli), used by the table's block trailers ----------------------------------------

def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    # LevelDB masks stored CRCs so that a CRC of data that itself contains CRCs stays well distributed.
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# --- protobuf wire format, decoded by hand -----------------------------------------------------------

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    for _ in range(10):
        if pos >= len(buf):
            raise _Corrupt("varint runs past the end of its buffer")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
    raise _Corrupt("varint longer than 10 bytes")


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """Yield (field number, value): ints for varint/fixed fields, bytes for length-delimited ones."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        value: int | bytes
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            if pos + n > len(buf):
                raise _Corrupt("fixed-width field runs past the end")
            value = int.from_bytes(buf[pos:pos + n], "little")
            pos += n
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > len(buf):
                raise _Corrupt("length-delimited field runs past the end")
            value = bytes(buf[pos:pos + n])
            pos += n
        else:
            raise _Corrupt(f"unsupported protobuf wire type {wire}")
        yield field, value


@dataclass
class BundleEntry:
    """One tensor's `BundleEntryProto`: where its bytes live and what they are."""
    dtype: int = 0
    shape: tuple[int, ...] = ()
    shard_id: int = 0
    offset: int = 0
    size: int = 0
    crc32c: int = 0
    sliced: bool = False


def _parse_shape(buf: bytes) -> tuple[int, ...]:
    dims = []
    for field, value in _proto_fields(buf):
        if field == 2 and isinstance(value, bytes):  # Dim {int64 size = 1; string name = 2}
            size = 0
            for f, v in _proto_fields(value):
                if f == 1 and isinstance(v, int):
                    size = v
            dims.append(size)
        elif field == 3 and value:
            raise _Corrupt("tensor shape has unknown rank")
    return tuple(dims)


def _parse_entry(buf: bytes) -> BundleEntry:
    e = BundleEntry()
    for field, value in _proto_fields(buf):
        if field == 1 and isinstance(value, int):
            e.dtype = value
        elif field == 2 and isinstance(value, bytes):
            e.shape = _parse_shape(value)
        elif field == 3 and isinstance(value, int):
            e.shard_id = value
        elif field == 4 and isinstance(value, int):
            e.offset = value
        elif field == 5 and isinstance(value, int):
            e.size = value
        elif field == 6 and isinstance(value, int):
            e.crc32c = value
        elif field == 7:
            e.sliced = True
    return e


def _parse_header(buf: bytes) -> tuple[int, int]:
    """(num_shards, endianness) from the `BundleHeaderProto`; endianness 0 = little."""
    num_shards, endianness = 1, 0
    for field, value in _proto_fields(buf):
        if field == 1 and isinstance(value, int):
            num_shards = value
        elif field == 2 and isinstance(value, int):
            endianness = value
    return num_shards, endianness


# --- the sorted-table (.index) file ------------------------------------------------------------------

def _block_handle(buf: bytes, pos: int = 0) -> tuple[int, int, int]:
    offset, pos = _varint(buf, pos)
    size, pos = _varint(buf, pos)
    return offset, size, pos


def _read_block(data: bytes, offset: int, size: int) -> bytes:
    end = offset + size + BLOCK_TRAILER_SIZE
    if end > len(data):
        raise _Corrupt(f"block at {offset} (+{size}) runs past the end of the file ({len(data)} bytes)")
    contents = data[offset:offset + size]
    ctype = data[offset + size]
    stored_crc = int.from_bytes(data[offset + size + 1:end], "little")
    if masked_crc32c(contents + bytes([ctype])) != stored_crc:
        raise _Corrupt(f"checksum mismatch in block at {offset}")
    if ctype == 1:
        raise _Corrupt("block is snappy-compressed, which this reader does not support; "
                       "re-save the checkpoint without compression")
    if ctype != 0:
        raise _Corrupt(f"unknown block compression type {ctype}")
    return contents


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Decode a block's prefix-compressed entries; the restart array at its end is only an index."""
    if len(block) < 4:
        raise _Corrupt("block shorter than its restart count")
    n_restarts = int.from_bytes(block[-4:], "little")
    limit = len(block) - 4 - 4 * n_restarts
    if limit < 0:
        raise _Corrupt(f"block claims {n_restarts} restarts, more than fit in {len(block)} bytes")
    pos, key = 0, b""
    while pos < limit:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        if shared > len(key) or pos + unshared + value_len > limit:
            raise _Corrupt(f"block entry at {pos} overruns its block")
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + value_len]
        pos += value_len


def read_table(data: bytes) -> dict[bytes, bytes]:
    """Every key/value pair of a LevelDB-format table held in `data`."""
    if len(data) < FOOTER_SIZE:
        raise _Corrupt(f"file is {len(data)} bytes, shorter than the {FOOTER_SIZE}-byte table footer")
    footer = data[-FOOTER_SIZE:]
    if int.from_bytes(footer[-8:], "little") != TABLE_MAGIC:
        raise _Corrupt("bad magic number in the table footer (truncated or not a TF checkpoint index)")
    _, _, pos = _block_handle(footer)  # metaindex: TF writes nothing we need there
    index_offset, index_size, _ = _block_handle(footer, pos)
    table: dict[bytes, bytes] = {}
    for _, handle in _block_entries(_read_block(data, index_offset, index_size)):
        offset, size, _ = _block_handle(handle)
        table.update(_block_entries(_read_block(data, offset, size)))
    return table


# --- tensor bundle -----------------------------------------------------------------------------------

def read_bundle_index(index_path: Path) -> tuple[int, dict[str, BundleEntry]]:
    """(num_shards, entries by tensor name) from a bundle's .index file."""
    try:
        data = index_path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{index_path}: cannot read ({e.strerror}); {REDOWNLOAD}") from None
    try:
        table = read_table(data)
        if b"" not in table:
            raise _Corrupt("no bundle header (the empty key)")
        num_shards, endianness = _parse_header(table.pop(b""))
        entries = {k.decode("utf-8"): _parse_entry(v) for k, v in table.items()}
    except (_Corrupt, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index_path}: corrupt checkpoint index ({e}); {REDOWNLOAD}") from None
    if endianness != 0:
        raise CheckpointError(f"{index_path}: checkpoint was written big-endian; re-save it on a little-endian machine")
    if num_shards < 1:
        raise CheckpointError(f"{index_path}: corrupt checkpoint index (num_shards={num_shards}); {REDOWNLOAD}")
    return num_shards, entries


def shard_path(prefix: Path, shard: int, num_shards: int) -> Path:
    return prefix.with_name(f"{prefix.name}.data-{shard:05d}-of-{num_shards:05d}")


def _check_entry(name: str, e: BundleEntry, index_path: Path, num_shards: int) -> None:
    if e.sliced:
        raise CheckpointError(f"{index_path}: tensor {name} is stored in slices (partitioned), which is unsupported")
    if e.dtype != DT_FLOAT:
        dtype = DTYPE_NAMES.get(e.dtype, f"dtype enum {e.dtype}")
        raise CheckpointError(f"{index_path}: tensor {name} is {dtype}, expected float32; convert the checkpoint")
    if e.size != 4 * int(np.prod(e.shape, dtype=np.int64)):
        raise CheckpointError(f"{index_path}: tensor {name} has {e.size} bytes for shape {e.shape}; {REDOWNLOAD}")
    if not 0 <= e.shard_id < num_shards:
        raise CheckpointError(f"{index_path}: tensor {name} is in shard {e.shard_id} of {num_shards}; {REDOWNLOAD}")


def locate_tf_tensors(prefix: Path, names: list[str] | None = None) -> dict[str, tuple[Path, BundleEntry]]:
    """Where each float32 tensor (all, or `names`) of the V2 checkpoint `prefix` lives: its data shard and index
    entry, checked against the index and the shards' sizes without reading any tensor."""
    index_path = prefix.with_name(prefix.name + ".index")
    num_shards, entries = read_bundle_index(index_path)
    wanted = list(entries) if names is None else names
    for name in wanted:
        if name not in entries:
            raise CheckpointError(f"{index_path}: tensor {name} is missing; is this a GPT-2 checkpoint? {REDOWNLOAD}")
        _check_entry(name, entries[name], index_path, num_shards)
    located = {name: (shard_path(prefix, entries[name].shard_id, num_shards), entries[name]) for name in wanted}
    need: dict[Path, int] = {}
    for path, e in located.values():
        need[path] = max(need.get(path, 0), e.offset + e.size)
    for path, n in sorted(need.items()):
        try:
            size = path.stat().st_size
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read data shard ({e.strerror}); {REDOWNLOAD}") from None
        if n > size:
            raise CheckpointError(f"{path}: data shard is truncated ({size} bytes, the index needs {n}); {REDOWNLOAD}")
    return located


def read_tf_tensor(path: Path, name: str, e: BundleEntry, verify_crc: bool = False) -> np.ndarray:
    """One float32 tensor from its data shard, read into a fresh array (one copy; nothing else is read or kept)."""
    a = np.empty(e.size // 4, dtype="<f4")
    try:
        with path.open("rb") as f:
            f.seek(e.offset)
            got = f.readinto(memoryview(a).cast("B")) if e.size else 0
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read data shard ({err.strerror}); {REDOWNLOAD}") from None
    if got != e.size:
        raise CheckpointError(f"{path}: short read of tensor {name}; {REDOWNLOAD}")
    if verify_crc and masked_crc32c(a.tobytes()) != e.crc32c:
        raise CheckpointError(f"{path}: checksum mismatch in tensor {name}; {REDOWNLOAD}")
    return a.reshape(e.shape).astype(np.float32, copy=False)


def read_tf_bundle(prefix: Path, names: list[str] | None = None, verify_crc: bool = False) -> dict[str, np.ndarray]:
    """Float32 tensors (all, or `names`) from the V2 checkpoint `prefix` (`prefix.index` + data shards).

    Sizes are always checked; `verify_crc` also checks each tensor's crc32c, which in pure Python
    takes minutes for a full-size model, hence off by default.
    """
    return {name: read_tf_tensor(path, name, e, verify_crc)
            for name, (path, e) in locate_tf_tensors(prefix, names).items()}


# --- the OpenAI directory ----------------------------------------------------------------------------

def tf_names(n_layer: int) -> dict[str, str]:
    """Canonical parameter name -> OpenAI's TF variable name."""
    names = {"wte": "model/wte", "wpe": "model/wpe", "ln_f.g": "model/ln_f/g", "ln_f.b": "model/ln_f/b"}
    for i in range(n_layer):
        for part in ("ln_1.g", "ln_1.b", "attn.c_attn.w", "attn.c_attn.b", "attn.c_proj.w", "attn.c_proj.b",
                     "ln_2.g", "ln_2.b", "mlp.c_fc.w", "mlp.c_fc.b", "mlp.c_proj.w", "mlp.c_proj.b"):
            names[f"h.{i}.{part}"] = f"model/h{i}/" + part.replace(".", "/")
    return names


def tf_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    # OpenAI's linear layers are 1x1 convolutions, so their weights carry a leading 1
    return (1, *shape) if name.endswith(".w") else shape


def read_json(path: Path, what: str) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing {what}; copy it into {path.parent} or re-download") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {what} ({e.strerror})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({e}); re-download it") from None


def read_encoder(path: Path) -> dict[str, int]:
    enc = read_json(path, "tokenizer vocabulary")
    if not isinstance(enc, dict) or not all(isinstance(v, int) for v in enc.values()):
        raise CheckpointError(f"{path}: expected a JSON object of token -> id; re-download it")
    return enc


def read_merges(path: Path) -> list[tuple[str, str]]:
    """BPE merges in rank order; an optional `#version` first line is skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing BPE merges file; copy it into {path.parent} or re-download") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read BPE merges ({e}); re-download it") from None
    # split on "\n" only: str.splitlines() would also split on characters that are valid in tokens
    lines = text.split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = []
    for n, line in enumerate(lines, start=2):
        parts = line.rstrip("\r").split(" ")
        if parts == [""]:
            continue
        if len(parts) != 2 or not all(parts):
            raise CheckpointError(f"{path}: line {n} is not a merge `a b`: {line[:40]!r}; re-download it")
        merges.append((parts[0], parts[1]))
    return merges


def write_merges(path: Path, merges: list[tuple[str, str]]) -> None:
    path.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")


def _checkpoint_prefix(d: Path) -> Path:
    """The bundle prefix: named by the `checkpoint` state file when present, else `model.ckpt`."""
    state = d / "checkpoint"
    if state.is_file():
        m = re.search(r'^model_checkpoint_path:\s*"(.*)"', state.read_text(encoding="utf-8", errors="replace"), re.M)
        if m:
            # the recorded path may be absolute on the machine that saved it; only its name matters here
            name = Path(m.group(1)).name
            if (d / (name + ".index")).exists():
                return d / name
    return d / "model.ckpt"


def _read_hparams(path: Path) -> dict[str, int]:
    hp = read_json(path, "hparams")
    if not isinstance(hp, dict):
        raise CheckpointError(f"{path}: expected a JSON object with {', '.join(HPARAM_KEYS)}")
    missing = [k for k in HPARAM_KEYS if not isinstance(hp.get(k), int)]
    if missing:
        raise CheckpointError(f"{path}: missing or non-integer {', '.join(missing)}; fix or re-download it")
    return {k: hp[k] for k in HPARAM_KEYS}


def open_openai(dir: Path) -> Checkpoint:
    """Open OpenAI's GPT-2 checkpoint directory: hparams, tokenizer and the tensors' places and shapes now, each
    tensor (float32) when it is used."""
    d = Path(dir)
    hp = _read_hparams(d / "hparams.json")
    encoder = read_encoder(d / "encoder.json")
    merges = read_merges(d / "vocab.bpe")
    prefix = _checkpoint_prefix(d)
    index_path = prefix.with_name(prefix.name + ".index")
    if not index_path.exists():
        raise CheckpointError(f"{index_path}: missing TensorFlow checkpoint index; {REDOWNLOAD}")
    names = tf_names(hp["n_layer"])
    located = locate_tf_tensors(prefix, list(names.values()))
    shapes = param_shapes(hp)
    for name, shape in shapes.items():
        have, want = located[names[name]][1].shape, tf_shape(name, shape)
        if have != want:
            raise CheckpointError(
                f"{index_path}: tensor {names[name]} has shape {have} but {d / 'hparams.json'} implies {want}; "
                "hparams.json does not belong to this checkpoint")

    def read(name: str) -> np.ndarray:
        path, e = located[names[name]]
        return read_tf_tensor(path, names[name], e).reshape(shapes[name])

    return Checkpoint(hp, encoder, merges, LazyParams(shapes, read, str(d)), source=str(d))


def write_openai(ckpt: Checkpoint, dir: Path) -> None:
    """Write `ckpt` the way OpenAI published GPT-2, with a real TensorFlow Saver (needs `gpt-sql[tf]`)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ start-up chatter is noise here
    try:
        import tensorflow as tf
    except ImportError:
        raise CheckpointError("writing a TensorFlow checkpoint needs TensorFlow: pip install 'gpt-sql[tf]'") from None
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "hparams.json").write_text(json.dumps({k: ckpt.hparams[k] for k in HPARAM_KEYS}, indent=2) + "\n")
    (d / "encoder.json").write_text(json.dumps(ckpt.encoder, ensure_ascii=False), encoding="utf-8")
    write_merges(d / "vocab.bpe", ckpt.merges)
    names = tf_names(ckpt.hparams["n_layer"])
    graph = tf.Graph()
    with graph.as_default():
        feeds, var_list = {}, {}
        for name, tf_name in names.items():
            a = np.asarray(ckpt.params[name], dtype=np.float32).reshape(tf_shape(name, ckpt.params[name].shape))
            # feed values through placeholders: constants would be baked into the graph (2 GB limit)
            ph = tf.compat.v1.placeholder(tf.float32, a.shape)
            var = tf.compat.v1.Variable(ph, name=tf_name)
            feeds[ph] = a
            var_list[tf_name] = var
        saver = tf.compat.v1.train.Saver(var_list=var_list, save_relative_paths=True)
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer(), feed_dict=feeds)
            saver.save(sess, str(d / "model.ckpt"))
