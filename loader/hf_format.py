"""Hugging Face GPT-2 directories: config.json, vocab.json, merges.txt, model.safetensors.

HF's GPT-2 uses Conv1D layers whose weights are already [n_in, n_out], like OpenAI's, so only the
names change. Half-precision tensors are widened to float32 on reading.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .checkpoint import Checkpoint, CheckpointError, param_shapes
from .openai_format import read_encoder, read_json, read_merges, write_merges

ENDOFTEXT = "<|endoftext|>"
NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}
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


def _raw_header(path: Path) -> tuple[dict, int]:
    """The safetensors JSON header and where tensor data starts; only needed for bf16."""
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


def _read_bf16(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    # numpy has no bfloat16; a bf16 value is the top half of a float32, so widen by shifting the bits
    header, start = _raw_header(path)
    out = {}
    with path.open("rb") as f:
        for name in names:
            begin, end = header[name]["data_offsets"]
            f.seek(start + begin)
            raw = np.frombuffer(f.read(end - begin), dtype="<u2")
            if raw.size != int(np.prod(header[name]["shape"], dtype=np.int64)):
                raise CheckpointError(f"{path}: tensor {name} is truncated; re-download the file")
            out[name] = (raw.astype(np.uint32) << 16).view(np.float32).reshape(header[name]["shape"])
    return out


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file as float32 (from F32, F16, F64 or BF16)."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, np.ndarray] = {}
    bf16: list[str] = []
    try:
        with safe_open(str(path), framework="np") as f:
            for name in f.keys():
                dtype = f.get_slice(name).get_dtype()
                if dtype == "BF16":
                    bf16.append(name)
                elif dtype in NUMPY_DTYPES:
                    out[name] = np.asarray(f.get_tensor(name)).astype(np.float32, copy=False)
                else:
                    raise CheckpointError(f"{path}: tensor {name} has dtype {dtype}; expected a float type")
        out.update(_read_bf16(path, bf16))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; re-download the model") from None
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e}); re-download it") from None
    return out


def read_hf(dir: Path) -> Checkpoint:
    """Read a Hugging Face GPT-2 directory into canonical float32 parameters."""
    d = Path(dir)
    config = d / "config.json"
    hp = _read_hparams(config)
    encoder = read_encoder(d / "vocab.json")
    merges = read_merges(d / "merges.txt")
    tensors: dict[str, np.ndarray] = {}
    for f in _safetensors_files(d):
        for name, a in read_safetensors(f).items():
            tensors[name.removeprefix("transformer.")] = a
    lm_head = tensors.pop("lm_head.weight", None)
    names = hf_names(hp["n_layer"])
    params = {}
    for name, shape in param_shapes(hp).items():
        hf = names[name]
        if hf not in tensors:
            raise CheckpointError(f"{d}: tensor {hf} is missing; is this a GPT-2 checkpoint? re-download it")
        a = tensors.pop(hf)
        if a.shape != shape:
            raise CheckpointError(
                f"{d}: tensor {hf} has shape {a.shape} but {config} implies {shape}; "
                "config.json does not belong to these weights")
        params[name] = a
    extra = sorted(n for n in tensors if not _is_buffer(n))
    if extra:
        raise CheckpointError(f"{d}: unexpected tensors {extra[:3]}; not a plain GPT-2 model")
    if lm_head is not None and not np.array_equal(lm_head, params["wte"]):
        raise CheckpointError(f"{d}: lm_head.weight differs from wte (untied output layer), which is unsupported")
    return Checkpoint(hp, encoder, merges, params, source=str(d))


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
