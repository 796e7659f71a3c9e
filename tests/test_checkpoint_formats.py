"""Round trips and failure modes of the OpenAI (TF tensor bundle) and Hugging Face (safetensors) readers."""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).parent))  # noqa: E401,E702  (no conftest: tiny.py)

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gpt_sql.loader.checkpoint import Checkpoint, CheckpointError, read_checkpoint
from gpt_sql.loader.hf_format import hf_names, write_hf
from gpt_sql.loader.openai_format import (TABLE_MAGIC, crc32c, masked_crc32c, read_tf_bundle, tf_names, tf_shape,
                                          write_merges, write_openai)
from conftest import require
from tiny import SHARED_GPT2, make_checkpoint

needs_gpt2 = pytest.mark.skipif(not (SHARED_GPT2 / "encoder.json").exists(),
                                reason=f"real GPT-2 tokenizer not found in {SHARED_GPT2}")


@pytest.fixture(scope="module")
def ckpt() -> Checkpoint:
    return make_checkpoint()


@pytest.fixture(scope="module")
def tf():
    return require("tensorflow", reason="TensorFlow is needed to write OpenAI checkpoints: "
                                        "pip install 'gpt-sql[tf]'")


def assert_same(a: Checkpoint, b: Checkpoint) -> None:
    assert a.hparams == b.hparams
    assert a.encoder == b.encoder
    assert a.merges == b.merges
    assert a.params.keys() == b.params.keys()
    for name in a.params:
        assert b.params[name].dtype == np.float32
        np.testing.assert_array_equal(a.params[name], b.params[name], err_msg=name)


def raises_checkpoint_error(fn, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, "error messages are one line"
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    return msg


# --- a pure-Python tensor bundle writer: lets the reader be tested without TensorFlow, and with shapes of
# --- table (many blocks, snappy flags, other dtypes) that TensorFlow would not produce for a tiny model

def pb_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def pb_field(number: int, value: int | bytes) -> bytes:
    if isinstance(value, bytes):
        return pb_varint(number << 3 | 2) + pb_varint(len(value)) + value
    return pb_varint(number << 3) + pb_varint(value)


def bundle_entry(dtype: int, shape: tuple[int, ...], offset: int, data: bytes) -> bytes:
    shape_pb = b"".join(pb_field(2, pb_field(1, d)) for d in shape)
    return (pb_field(1, dtype) + pb_field(2, shape_pb) + pb_field(4, offset) + pb_field(5, len(data))
            + pb_varint(6 << 3 | 5) + struct.pack("<I", masked_crc32c(data)))


def table_block(items: list[tuple[bytes, bytes]], restart_interval: int = 4) -> bytes:
    buf, restarts, prev = bytearray(), [], b""
    for i, (key, value) in enumerate(items):
        shared = 0
        if i % restart_interval == 0:
            restarts.append(len(buf))
        else:
            while shared < min(len(prev), len(key)) and prev[shared] == key[shared]:
                shared += 1
        buf += pb_varint(shared) + pb_varint(len(key) - shared) + pb_varint(len(value)) + key[shared:] + value
        prev = key
    restarts = restarts or [0]
    return bytes(buf) + b"".join(struct.pack("<I", r) for r in restarts) + struct.pack("<I", len(restarts))


def write_table(items: dict[bytes, bytes], block_size: int, compression: int = 0) -> bytes:
    out = bytearray()

    def emit(block: bytes) -> bytes:
        handle = pb_varint(len(out)) + pb_varint(len(block))
        out.extend(block + bytes([compression]) + struct.pack("<I", masked_crc32c(block + bytes([compression]))))
        return handle

    index, group, group_bytes = [], [], 0
    for key in sorted(items):
        group.append((key, items[key]))
        group_bytes += len(key) + len(items[key])
        if group_bytes >= block_size:
            index.append((key, emit(table_block(group))))
            group, group_bytes = [], 0
    if group:
        index.append((group[-1][0], emit(table_block(group))))
    footer = emit(table_block([])) + emit(table_block(index, restart_interval=1))
    return bytes(out) + footer.ljust(40, b"\0") + struct.pack("<Q", TABLE_MAGIC)


def write_bundle(prefix: Path, tensors: dict[str, np.ndarray], block_size: int = 256,
                 dtype: int = 1, compression: int = 0) -> None:
    data, items = bytearray(), {b"": pb_field(1, 1) + pb_field(3, pb_field(1, 1))}  # header: 1 shard, version 1
    for name, a in tensors.items():
        raw = a.astype("<f4").tobytes()
        items[name.encode()] = bundle_entry(dtype, a.shape, len(data), raw)
        data += raw
    prefix.with_name(prefix.name + ".data-00000-of-00001").write_bytes(data)
    prefix.with_name(prefix.name + ".index").write_bytes(write_table(items, block_size, compression))


def write_openai_py(c: Checkpoint, d: Path, **bundle_options) -> None:
    """OpenAI's directory layout with the bundle written by write_bundle instead of TensorFlow."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "hparams.json").write_text(json.dumps(c.hparams))
    (d / "encoder.json").write_text(json.dumps(c.encoder), encoding="utf-8")
    write_merges(d / "vocab.bpe", c.merges)
    (d / "checkpoint").write_text('model_checkpoint_path: "/elsewhere/model.ckpt"\n')
    tensors = {tf_name: c.params[n].reshape(tf_shape(n, c.params[n].shape))
               for n, tf_name in tf_names(c.hparams["n_layer"]).items()}
    write_bundle(d / "model.ckpt", tensors, **bundle_options)


# --- OpenAI format -------------------------------------------------------------------------------------

def test_crc32c_known_value():
    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value


def test_openai_roundtrip_tensorflow(tf, ckpt, tmp_path):
    write_openai(ckpt, tmp_path)
    for name in ("hparams.json", "encoder.json", "vocab.bpe", "checkpoint", "model.ckpt.index",
                 "model.ckpt.data-00000-of-00001", "model.ckpt.meta"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "vocab.bpe").read_text(encoding="utf-8").startswith("#version: 0.2\n")
    got = read_checkpoint(tmp_path)
    assert_same(ckpt, got)
    assert got.source == str(tmp_path)


def test_tensorflow_bundle_layout_and_checksums(tf, ckpt, tmp_path):
    write_openai(ckpt, tmp_path)
    tensors = read_tf_bundle(tmp_path / "model.ckpt", verify_crc=True)
    assert set(tensors) == set(tf_names(ckpt.hparams["n_layer"]).values())
    assert tensors["model/h0/attn/c_attn/w"].shape == (1, 32, 96)
    assert tensors["model/wte"].shape == (ckpt.hparams["n_vocab"], 32)


@needs_gpt2
def test_openai_roundtrip_real_tokenizer(tf, tmp_path):
    c = make_checkpoint(real_tokenizer=True, n_layer=1)
    write_openai(c, tmp_path)
    assert_same(c, read_checkpoint(tmp_path))


@pytest.mark.parametrize("block_size", [64, 1 << 20])
def test_openai_pure_python_bundle(ckpt, tmp_path, block_size):
    # small blocks: many data blocks and index entries, prefix-compressed keys across restarts
    write_openai_py(ckpt, tmp_path, block_size=block_size)
    assert_same(ckpt, read_checkpoint(tmp_path))


def test_tensorflow_and_pure_python_bundles_agree(tf, ckpt, tmp_path):
    write_openai(ckpt, tmp_path / "tf")
    write_openai_py(ckpt, tmp_path / "py")
    a, b = read_tf_bundle(tmp_path / "tf" / "model.ckpt"), read_tf_bundle(tmp_path / "py" / "model.ckpt")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.fixture(params=["tensorflow", "pure-python"])
def openai_dir(request, ckpt, tmp_path) -> Path:
    if request.param == "tensorflow":
        request.getfixturevalue("tf")
        write_openai(ckpt, tmp_path)
    else:
        write_openai_py(ckpt, tmp_path)
    return tmp_path


def test_truncated_data_shard(openai_dir):
    shard = openai_dir / "model.ckpt.data-00000-of-00001"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    raises_checkpoint_error(lambda: read_checkpoint(openai_dir), str(shard), "truncated", "re-download")


def test_missing_data_shard(openai_dir):
    shard = openai_dir / "model.ckpt.data-00000-of-00001"
    shard.unlink()
    raises_checkpoint_error(lambda: read_checkpoint(openai_dir), str(shard), "re-download")


def test_corrupt_index_bytes(openai_dir):
    index = openai_dir / "model.ckpt.index"
    data = bytearray(index.read_bytes())
    data[len(data) // 3] ^= 0x5A
    index.write_bytes(bytes(data))
    raises_checkpoint_error(lambda: read_checkpoint(openai_dir), str(index), "corrupt", "re-download")


@pytest.mark.parametrize("keep", [0, 10, 47, -20])
def test_truncated_index(openai_dir, keep):
    index = openai_dir / "model.ckpt.index"
    data = index.read_bytes()
    index.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    raises_checkpoint_error(lambda: read_checkpoint(openai_dir), str(index), "corrupt")


def test_missing_index(openai_dir):
    (openai_dir / "model.ckpt.index").unlink()
    raises_checkpoint_error(lambda: read_checkpoint(openai_dir), "model.ckpt.index", "missing")


def test_hparams_disagree_with_tensor_shapes(openai_dir, ckpt):
    hp = json.loads((openai_dir / "hparams.json").read_text())
    (openai_dir / "hparams.json").write_text(json.dumps({**hp, "n_embd": 64}))  # tiny has n_embd 32
    raises_checkpoint_error(lambda: read_checkpoint(openai_dir), "hparams.json does not belong",
                            f"model/wte has shape ({hp['n_vocab']}, 32)", f"implies ({hp['n_vocab']}, 64)")


def test_hparams_claim_more_layers(openai_dir):
    hp = json.loads((openai_dir / "hparams.json").read_text())
    (openai_dir / "hparams.json").write_text(json.dumps({**hp, "n_layer": 3}))
    raises_checkpoint_error(lambda: read_checkpoint(openai_dir), "model/h2/", "missing")


def test_hparams_missing_key(openai_dir):
    (openai_dir / "hparams.json").write_text('{"n_vocab": 5}')
    raises_checkpoint_error(lambda: read_checkpoint(openai_dir), "hparams.json", "n_ctx")


@pytest.mark.parametrize("name,fragment", [("vocab.bpe", "missing BPE merges"),
                                           ("encoder.json", "missing tokenizer vocabulary")])
def test_missing_tokenizer_file(openai_dir, name, fragment):
    (openai_dir / name).unlink()
    raises_checkpoint_error(lambda: read_checkpoint(openai_dir), str(openai_dir / name), fragment)


def test_bad_merges_line(ckpt, tmp_path):
    write_openai_py(ckpt, tmp_path)
    with (tmp_path / "vocab.bpe").open("a", encoding="utf-8") as f:
        f.write("one two three\n")
    raises_checkpoint_error(lambda: read_checkpoint(tmp_path), "vocab.bpe", "not a merge")


def test_non_float_tensor_rejected(ckpt, tmp_path):
    write_openai_py(ckpt, tmp_path, dtype=19)  # DT_HALF
    raises_checkpoint_error(lambda: read_checkpoint(tmp_path), "float16, expected float32")


def test_snappy_blocks_rejected(ckpt, tmp_path):
    write_openai_py(ckpt, tmp_path, compression=1)
    raises_checkpoint_error(lambda: read_checkpoint(tmp_path), "model.ckpt.index", "snappy")


def test_unknown_directory(tmp_path):
    raises_checkpoint_error(lambda: read_checkpoint(tmp_path / "nope"), "nope", "no such file")
    raises_checkpoint_error(lambda: read_checkpoint(tmp_path), "not a GPT-2 checkpoint", "hparams.json")


# --- Hugging Face format ---------------------------------------------------------------------------------

def test_hf_roundtrip_float32(ckpt, tmp_path):
    write_hf(ckpt, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gpt2"
    assert config["eos_token_id"] == config["bos_token_id"] == ckpt.encoder["<|endoftext|>"]
    assert (tmp_path / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")
    assert set(load_file(str(tmp_path / "model.safetensors"))) == set(hf_names(ckpt.hparams["n_layer"]).values())
    assert_same(ckpt, read_checkpoint(tmp_path))


def test_hf_roundtrip_float16(ckpt, tmp_path):
    write_hf(ckpt, tmp_path, dtype="float16")
    assert load_file(str(tmp_path / "model.safetensors"))["wte.weight"].dtype == np.float16
    got = read_checkpoint(tmp_path)
    for name, a in ckpt.params.items():
        assert got.params[name].dtype == np.float32
        np.testing.assert_array_equal(got.params[name], a.astype(np.float16).astype(np.float32), err_msg=name)
        np.testing.assert_allclose(got.params[name], a, rtol=2 ** -11, atol=2 ** -24, err_msg=name)


def write_bf16_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """safetensors by hand, because numpy has no bfloat16 (round to nearest even on the top 16 bits)."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, a in tensors.items():
        bits = a.astype(np.float32).view(np.uint32)
        raw = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def test_hf_bfloat16(ckpt, tmp_path):
    write_hf(ckpt, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    write_bf16_safetensors(tmp_path / "model.safetensors", tensors)
    got = read_checkpoint(tmp_path)
    for name, a in ckpt.params.items():
        assert got.params[name].dtype == np.float32
        assert not np.any(got.params[name].view(np.uint32) & 0xFFFF), "bf16 widening leaves the low bits zero"
        np.testing.assert_allclose(got.params[name], a, rtol=2 ** -8, err_msg=name)


def test_hf_prefix_buffers_and_tied_head(ckpt, tmp_path):
    write_hf(ckpt, tmp_path)
    tensors = {"transformer." + k: v for k, v in load_file(str(tmp_path / "model.safetensors")).items()}
    tensors["transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    tensors["transformer.h.0.attn.masked_bias"] = np.array(-1e4, np.float32)
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].copy()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert_same(ckpt, read_checkpoint(tmp_path))

    tensors["lm_head.weight"][0, 0] += 1
    save_file(tensors, str(tmp_path / "model.safetensors"))
    raises_checkpoint_error(lambda: read_checkpoint(tmp_path), "lm_head.weight differs from wte")


def test_hf_merges_without_version_header(ckpt, tmp_path):
    write_hf(ckpt, tmp_path)
    merges = tmp_path / "merges.txt"
    merges.write_text(merges.read_text(encoding="utf-8").split("\n", 1)[1], encoding="utf-8")
    assert read_checkpoint(tmp_path).merges == ckpt.merges


@needs_gpt2
def test_hf_roundtrip_real_tokenizer(tmp_path):
    c = make_checkpoint(real_tokenizer=True, n_layer=1)
    write_hf(c, tmp_path)
    assert_same(c, read_checkpoint(tmp_path))


def test_hf_config_disagrees_with_tensor_shapes(ckpt, tmp_path):
    write_hf(ckpt, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_positions": 128}))
    raises_checkpoint_error(lambda: read_checkpoint(tmp_path), "wpe.weight", "config.json does not belong")


@pytest.mark.parametrize("name,fragment", [("vocab.json", "missing tokenizer vocabulary"),
                                           ("merges.txt", "missing BPE merges"),
                                           ("model.safetensors", "missing model weights")])
def test_hf_missing_file(ckpt, tmp_path, name, fragment):
    write_hf(ckpt, tmp_path)
    (tmp_path / name).unlink()
    raises_checkpoint_error(lambda: read_checkpoint(tmp_path), str(tmp_path / name), fragment)


def test_hf_pytorch_only(ckpt, tmp_path):
    write_hf(ckpt, tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    raises_checkpoint_error(lambda: read_checkpoint(tmp_path), "pytorch_model.bin", "safe_serialization")


def test_hf_corrupt_safetensors(ckpt, tmp_path):
    write_hf(ckpt, tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    raises_checkpoint_error(lambda: read_checkpoint(tmp_path), str(weights), "re-download")


def test_hf_other_model_type(ckpt, tmp_path):
    write_hf(ckpt, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    raises_checkpoint_error(lambda: read_checkpoint(tmp_path), "llama", "only GPT-2")
