"""`gpt-sql inspect` for people: the logit lens as a table and each layer's most backward-looking head in the
terminal, or every head's attention map and the lens drawn into one PNG.

Both read the result as `--json` prints it: {"tokens": [ids], "attention": [layer][head][query][key],
"lens": [layer][position] = {"token": id, "prob": p}}, with `text_of(id)` giving a token's text.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

TextOf = Callable[[int], str]


class InspectViewError(Exception):
    pass


def visible(text: str, width: int) -> str:
    """A token's text in one short cell: spaces as '·' (GPT-2 tokens mostly start with one), escapes for
    newlines and other control characters, '…' when cut."""
    shown = "".join("·" if c == " " else c if c.isprintable() else repr(c)[1:-1] for c in text) or "∅"
    return shown if len(shown) <= width else shown[: width - 1] + "…"


def off_diagonal(weights: np.ndarray) -> np.ndarray:
    """Per head, the mean attention on earlier positions (1 - the weight on itself) over the query positions
    that have any (all but the first); weights[head][query][key]."""
    n = weights.shape[-1]
    if n < 2:
        return np.zeros(weights.shape[0])
    return 1 - np.diagonal(weights, axis1=-2, axis2=-1)[:, 1:].mean(axis=-1)


def backward_heads(attention: np.ndarray, tokens: list[int], text_of: TextOf) -> list[str]:
    """Per layer: its head that attends most away from the diagonal, and that head's strongest such pair."""
    if len(tokens) < 2:
        return ["a 1-token prompt: every head can only attend to the token itself"]
    lines = []
    for layer, weights in enumerate(attention):
        share = off_diagonal(weights)
        head = int(np.argmax(share))
        masked = np.tril(weights[head], k=-1)  # earlier keys only
        q, k = np.unravel_index(int(np.argmax(masked)), masked.shape)
        lines.append(f"layer {layer}: head {head} looks back {share[head]:.0%}; most: "
                     f"{visible(text_of(tokens[q]), 10)} -> {visible(text_of(tokens[k]), 10)} ({masked[q, k]:.2f})")
    return lines


def lens_table(data: dict, text_of: TextOf, width: int) -> list[str]:
    """The lens as rows of layers and columns of positions, cut into blocks of positions that fit `width`."""
    tokens, lens = data["tokens"], data["lens"]
    label_w, cell_w = len(f"after block {len(lens) - 1}"), 13
    per_block = max(1, (width - label_w - 1) // (cell_w + 1))
    lines = []
    for first in range(0, len(tokens), per_block):
        cols = range(first, min(first + per_block, len(tokens)))
        lines.append(" " * label_w + "".join(f" {visible(text_of(tokens[p]), cell_w):<{cell_w}}" for p in cols))
        for layer, row in enumerate(lens):
            cells = []
            for p in cols:
                prob = f" {row[p]['prob']:.0%}"
                cells.append(f" {visible(text_of(row[p]['token']), cell_w - len(prob)) + prob:<{cell_w}}")
            lines.append(f"{f'after block {layer}':<{label_w}}" + "".join(cells))
        lines.append("")
    return lines


def render_terminal(data: dict, text_of: TextOf, width: int | None = None) -> str:
    width = width or shutil.get_terminal_size().columns
    attention = np.asarray(data["attention"], dtype=float)
    n_layer, n_head = attention.shape[:2]
    lines = [f"{len(data['tokens'])} tokens, {n_layer} layers x {n_head} heads", "",
             "logit lens: the most likely next token after each block, and its probability"]
    lines += lens_table(data, text_of, width)
    lines += ["attention: per layer, the head looking back most (mean weight off the diagonal)",
              "and its strongest pair, query -> earlier key"]
    lines += ["  " + line for line in backward_heads(attention, data["tokens"], text_of)]
    return "\n".join(line[:width] for line in lines)


def render_png(data: dict, text_of: TextOf, path: str | Path) -> None:
    """One picture: a row of heatmaps per layer (one per head, query down, key across), then the lens as a grid
    of layers x positions coloured by probability and labelled with the token."""
    try:
        import matplotlib
    except ImportError:
        raise InspectViewError("--png needs matplotlib: pip install 'gpt-sql[png]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attention = np.asarray(data["attention"], dtype=float)
    n_layer, n_head, n = attention.shape[:3]
    labels = [visible(text_of(t), 10) for t in data["tokens"]]
    lens_tokens = [[visible(text_of(c["token"]), 8) for c in row] for row in data["lens"]]
    lens_probs = np.array([[c["prob"] for c in row] for row in data["lens"]], dtype=float)

    # a head's map gets 1.2..2.4 in, less for big models, so that 48 layers x 25 heads stays about 3,000 x 5,000 px
    side = min(2.4, max(1.2, 30 / n_head), max(1.2, 60 / n_layer))
    font = max(3.0, min(7.0, side * 40 / max(n, 1)))
    step = max(1, math.ceil(n / (side * 12)))  # label every step-th token where they would overlap
    lens_w, lens_h = max(6.0, 0.75 * n), max(2.0, 0.28 * n_layer + 1)
    fig_w = max(n_head * side + 0.8, lens_w)
    fig = plt.figure(figsize=(fig_w, n_layer * (side + 0.35) + lens_h + 0.6), dpi=90, layout="constrained")
    maps, lens = fig.subfigures(2, 1, height_ratios=[n_layer * (side + 0.35), lens_h + 0.6])
    axes = np.atleast_2d(maps.subplots(n_layer, n_head, squeeze=False))
    ticks = list(range(0, n, step))
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer, head]
            ax.imshow(attention[layer, head], cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"layer {layer} head {head}", fontsize=max(5.0, min(8.0, side * 3.5)))
            ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=font)
            ax.set_yticks(ticks, [labels[i] for i in ticks] if head == 0 else [], fontsize=font)
            ax.tick_params(length=0)
    maps.suptitle("attention: each query position (row) over the positions up to it (column)", fontsize=10)

    ax = lens.subplots()
    ax.imshow(lens_probs, cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    for layer in range(n_layer):
        for p in range(n):
            ax.text(p, layer, lens_tokens[layer][p], ha="center", va="center", fontsize=7,
                    color="white" if lens_probs[layer, p] > 0.6 else "black")
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n_layer), [f"after block {layer}" for layer in range(n_layer)], fontsize=7)
    ax.tick_params(length=0)
    lens.suptitle("logit lens: the most likely next token after each block (colour: its probability)", fontsize=10)
    try:
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
