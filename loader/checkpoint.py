"""The standard GPT-2 parameter set every checkpoint format is read into.

Parameter names follow picoGPT: `wte`, `wpe`, `h.{i}.ln_1.g`, `h.{i}.attn.c_attn.w`, ..., `ln_f.b`.
Matrices are stored [n_in, n_out] (TF/Conv1D orientation), so `linear(x, w, b) = x @ w + b`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HPARAM_KEYS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable, or inconsistent; the message says which and why."""


@dataclass
class Checkpoint:
    hparams: dict[str, int]
    encoder: dict[str, int]  # token string in GPT-2's byte-to-unicode alphabet -> token id
    merges: list[tuple[str, str]]  # BPE merges in rank order
    params: dict[str, np.ndarray] = field(repr=False)  # float32, names from param_shapes()
    source: str = ""  # where it came from, shown by `gpt-sql models`

    @property
    def n_params(self) -> int:
        return sum(int(a.size) for a in self.params.values())


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


def validate(ckpt: Checkpoint) -> Checkpoint:
    """Check hparams, tokenizer and every tensor against each other; raise CheckpointError on the first mismatch."""
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
    shapes = param_shapes(hp)
    for name, shape in shapes.items():
        if name not in ckpt.params:
            raise CheckpointError(f"{ckpt.source}: tensor {name} is missing")
        a = ckpt.params[name]
        if tuple(a.shape) != shape:
            raise CheckpointError(f"{ckpt.source}: tensor {name} has shape {tuple(a.shape)}, hparams imply {shape}")
        if not np.all(np.isfinite(a)):
            raise CheckpointError(f"{ckpt.source}: tensor {name} holds NaN or infinite values")
        ckpt.params[name] = np.ascontiguousarray(a, dtype=np.float32)
    extra = set(ckpt.params) - set(shapes)
    if extra:
        raise CheckpointError(f"{ckpt.source}: unexpected tensors {sorted(extra)[:5]}")
    return ckpt


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read an OpenAI (TF) or Hugging Face GPT-2 checkpoint directory, detected by its files."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if not p.is_dir():
        raise CheckpointError(f"{p}: expected a checkpoint directory")
    if (p / "hparams.json").exists():
        from .openai_format import read_openai
        return validate(read_openai(p))
    if (p / "config.json").exists():
        from .hf_format import read_hf
        return validate(read_hf(p))
    raise CheckpointError(
        f"{p}: not a GPT-2 checkpoint (expected hparams.json + model.ckpt.* from OpenAI, "
        "or config.json + model.safetensors from Hugging Face)")
