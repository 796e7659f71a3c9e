"""Hugging Face GPT-2 directories: config.json, vocab.json, merges.txt, model.safetensors.

HF's GPT-2 uses Conv1D layers whose weights are already [n_in, n_out], like OpenAI's, so only the
names change. Half-precision tensors are widened to float32 on reading.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint import Checkpoint, CheckpointError, LazyParams, param_shapes
from .openai_format import read_encoder, read_json, read_merges, write_merges

ENDOFTEXT = "<|endoftext|>"
WRITE_DTYPES = {"float32": np.float32, "float16": np.float16}
CONVERT_HINT = ("convert it with transformers: "
                "GPT2LMHeadModel.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)")


def hf_names(n_layer: int) -> dict[str, str]:
    """Canonical parameter name -> HF GPT2Model tensor name."""
    names = {"wte": "wte.weight", "wpe": "wpe.weight", "ln_f.g": "ln_f.weight", "ln_f.b": "ln_f.bias"}
    for i in range(n_layer):
        for layer in ("ln_1", "ln_2"):
            names[f"h.{i}.{layer}.g"] = f"h.{i}.{layer}.weight"
            names[f"h.{i}.{layer}.b"] = f"h.{i}.{layer}.bias"
        for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            names[f"h.{i}.{layer}.w"] = f"h.{i}.{layer}.weight"
            names[f"h.{i}.{layer}.b"] = f"h.{i}.{layer}.bias"
    return names


def _is_buffer(name: str) -> bool:
    # the causal-mask buffers older transformers versions saved alongside the weights
    return name.startswith("h.") and name.endswith((".attn.bias", ".attn.masked_bias"))


def _read_hparams(path: Path) -> dict[str, int]:
    cfg = read_json(path, "model config")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"{path}: model_type is {cfg['model_type']!r}, only GPT-2 (\"gpt2\") is supported")
    sources = {"n_vocab": ("vocab_size",), "n_ctx": ("n_positions", "n_ctx"),
               "n_embd": ("n_embd",), "n_head": ("n_head",), "n_layer": ("n_layer",)}
    hp: dict[str, int] = {}
    for key, candidates in sources.items():
        found = [cfg[c] for c in candidates if isinstance(cfg.get(c), int)]
        if not found:
            raise CheckpointError(f"{path}: missing or non-integer {' or '.join(candidates)}; fix the config")
        hp[key] = found[0]
    return hp


def _safetensors_files(d: Path) -> list[Path]:
    single = d / "model.safetensors"
    if single.exists():
        return [single]
    index = d / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index, "safetensors shard index")
        if not isinstance(weight_map, dict) or not isinstance(weight_map.get("weight_map"), dict):
            raise CheckpointError(f"{index}: expected an object with a weight_map; re-download it")
        return [d / f for f in sorted(set(weight_map["weight_map"].values()))]
    if (d / "pytorch_model.bin").exists():
        raise CheckpointError(f"{d}: has only pytorch_model.bin, not model.safetensors; {CONVERT_HINT}")
    raise CheckpointError(f"{single}: missing model weights; download model.safetensors into {d}")


# safetensors dtype -> how its bytes are read; BF16 is widened by hand (numpy has no bfloat16)
STORED_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2"}


@dataclass(frozen=True)
class Stored:
    """Where one tensor's bytes are in a .safetensors file, from its header."""
    path: Path
    dtype: str  # the safetensors name: F32, F16, F64, BF16, ...
    shape: tuple[int, ...]
    start: int  # byte offsets in the file
    end: int


def _raw_header(path: Path) -> tuple[dict, int]:
    """The safetensors JSON header and where tensor data starts."""
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


def index_safetensors(path: Path) -> dict[str, Stored]:
    """Every tensor of a .safetensors file, located from its header without reading any data. safetensors itself
    checks the header against the file (JSON, dtypes, offsets that tile the file's length)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            names = list(f.keys())
        header, data_start = _raw_header(path)
        out = {}
        for name in names:
            begin, end = header[name]["data_offsets"]
            out[name] = Stored(path, header[name]["dtype"], tuple(header[name]["shape"]), data_start + begin,
                               data_start + end)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; re-download the model") from None
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e}); re-download it") from None
    return out


def read_stored(s: Stored, rows: slice | None = None) -> np.ndarray:
    """One tensor (or `rows` of it) as float32, read with plain file reads: nothing else of the file is mapped or
    kept, so reading tensor by tensor holds one at a time."""
    if s.dtype not in STORED_DTYPES:
        raise CheckpointError(f"{s.path}: tensor has dtype {s.dtype}; expected a float type")
    stored = np.dtype(STORED_DTYPES[s.dtype])
    shape = s.shape
    start, size = s.start, s.end - s.start
    if rows is not None:  # a block of rows of a matrix
        row = int(np.prod(shape[1:], dtype=np.int64)) * stored.itemsize
        first, stop, _ = rows.indices(shape[0])
        shape = (max(0, stop - first), *shape[1:])
        start, size = s.start + first * row, shape[0] * row
    raw = np.empty(shape, dtype=stored)
    if raw.nbytes != size:
        raise CheckpointError(f"{s.path}: tensor of shape {s.shape} has {s.end - s.start} bytes; re-download it")
    try:
        with s.path.open("rb") as f:
            f.seek(start)
            got = f.readinto(memoryview(raw.reshape(-1)).cast("B")) if size else 0
    except OSError as e:
        raise CheckpointError(f"{s.path}: cannot read ({e.strerror}); re-download it") from None
    if got != size:
        raise CheckpointError(f"{s.path}: truncated; re-download it")
    if s.dtype == "BF16":  # a bf16 value is the top half of a float32: widen by shifting the bits
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)


def _check_tied(wte: np.ndarray, lm_head: Stored, d: Path, block_bytes: int = 16 * 2**20) -> None:
    """lm_head.weight, when saved, must equal wte (GPT-2 ties them); compared a block of rows at a time."""
    if lm_head.shape != wte.shape:
        raise CheckpointError(f"{d}: lm_head.weight differs from wte (untied output layer), which is unsupported")
    step = max(1, block_bytes // max(1, wte[0].nbytes))
    for first in range(0, wte.shape[0], step):
        if not np.array_equal(read_stored(lm_head, slice(first, first + step)), wte[first:first + step]):
            raise CheckpointError(f"{d}: lm_head.weight differs from wte (untied output layer), which is unsupported")


def open_hf(dir: Path) -> Checkpoint:
    """Open a Hugging Face GPT-2 directory: config, tokenizer and the tensors' places and shapes now, each tensor
    (as float32) when it is used."""
    d = Path(dir)
    config = d / "config.json"
    hp = _read_hparams(config)
    encoder = read_encoder(d / "vocab.json")
    merges = read_merges(d / "merges.txt")
    stored: dict[str, Stored] = {}
    for f in _safetensors_files(d):
        for name, s in index_safetensors(f).items():
            stored[name.removeprefix("transformer.")] = s
    lm_head = stored.pop("lm_head.weight", None)
    names = hf_names(hp["n_layer"])
    shapes = param_shapes(hp)
    for name, shape in shapes.items():
        hf = names[name]
        if hf not in stored:
            raise CheckpointError(f"{d}: tensor {hf} is missing; is this a GPT-2 checkpoint? re-download it")
        if stored[hf].shape != shape:
            raise CheckpointError(
                f"{d}: tensor {hf} has shape {stored[hf].shape} but {config} implies {shape}; "
                "config.json does not belong to these weights")
        if stored[hf].dtype not in STORED_DTYPES:
            raise CheckpointError(f"{stored[hf].path}: tensor {hf} has dtype {stored[hf].dtype}; expected a float type")
    extra = sorted(n for n in set(stored) - set(names.values()) if not _is_buffer(n))
    if extra:
        raise CheckpointError(f"{d}: unexpected tensors {extra[:3]}; not a plain GPT-2 model")

    def read(name: str) -> np.ndarray:
        a = read_stored(stored[names[name]])
        if name == "wte" and lm_head is not None:
            _check_tied(a, lm_head, d)
        return a

    return Checkpoint(hp, encoder, merges, LazyParams(shapes, read, str(d)), source=str(d))


def write_hf(ckpt: Checkpoint, dir: Path, dtype: str = "float32") -> None:
    """Write `ckpt` as a Hugging Face GPT-2 directory loadable by transformers' GPT2LMHeadModel."""
    from safetensors.numpy import save_file

    if dtype not in WRITE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(WRITE_DTYPES)}, got {dtype!r}")
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    hp = ckpt.hparams
    eot = ckpt.encoder.get(ENDOFTEXT)
    config = {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": hp["n_vocab"], "n_positions": hp["n_ctx"], "n_ctx": hp["n_ctx"],
        "n_embd": hp["n_embd"], "n_head": hp["n_head"], "n_layer": hp["n_layer"],
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": True, "torch_dtype": dtype,
        "bos_token_id": eot, "eos_token_id": eot,
    }
    (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (d / "vocab.json").write_text(json.dumps(ckpt.encoder, ensure_ascii=False), encoding="utf-8")
    write_merges(d / "merges.txt", ckpt.merges)
    np_dtype = WRITE_DTYPES[dtype]
    tensors = {}
    for name, hf in hf_names(hp["n_layer"]).items():
        a = np.ascontiguousarray(ckpt.params[name], dtype=np_dtype)
        if not np.all(np.isfinite(a)):
            raise CheckpointError(f"tensor {name} does not fit in {dtype}; save as float32")
        tensors[hf] = a
    # transformers refuses safetensors files without format metadata
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
