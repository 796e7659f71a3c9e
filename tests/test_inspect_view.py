"""The pictures of `gpt-sql inspect`: the terminal view and the PNG, from synthetic results (no database)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from gpt_sql.runner import inspect_view

from conftest import require


def fake(n_layer: int, n_head: int, n: int, seed: int = 0) -> dict:
    """A result shaped like `inspect --json`: causal softmax rows, random lens tokens."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(n_layer, n_head, n, n)) + np.triu(np.full((n, n), -np.inf), k=1)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return {"tokens": [int(t) for t in rng.integers(0, 50, n)], "attention": weights.tolist(),
            "lens": [[{"token": int(rng.integers(0, 50)), "prob": float(rng.random())} for _ in range(n)]
                     for _ in range(n_layer)]}


def text_of(token: int) -> str:
    return f" tok{token}" if token % 3 else f"\n{token}"


def test_terminal_view_shows_every_layer_and_token():
    data = fake(2, 3, 5)
    view = inspect_view.render_terminal(data, text_of, width=200)
    for layer in range(2):
        assert f"after block {layer}" in view and f"layer {layer}: head " in view
    for t in data["tokens"]:
        assert inspect_view.visible(text_of(t), 13) in view
    assert "\n5 " not in view  # a newline inside a token is shown escaped, not printed


def test_wide_prompts_are_cut_into_blocks_that_fit():
    data = fake(3, 2, 60)
    view = inspect_view.render_terminal(data, text_of, width=80)
    assert max(len(line) for line in view.splitlines()) <= 80
    assert view.count("after block 2") > 1  # several blocks of positions, each with every layer


def test_the_backward_looking_head_is_found():
    data = fake(2, 4, 6)
    attention = np.array(data["attention"])
    attention[1, 2] = 0
    attention[1, 2, :, 0] = 1  # layer 1, head 2: every position looks at the first one
    data["attention"] = attention.tolist()
    view = inspect_view.render_terminal(data, text_of, width=200)
    assert "layer 1: head 2 looks back 100%" in view


def test_one_token_prompt():
    view = inspect_view.render_terminal(fake(2, 2, 1), text_of, width=100)
    assert "1-token prompt" in view


@pytest.mark.parametrize("shape", [(2, 3, 5), (12, 12, 20)])
def test_png(tmp_path, shape):
    require("matplotlib", reason="the PNG needs matplotlib: pip install 'gpt-sql[png]'")
    import matplotlib.image

    path = tmp_path / "inside.png"
    inspect_view.render_png(fake(*shape), text_of, path)
    image = matplotlib.image.imread(path)
    assert 200 <= image.shape[0] <= 30000 and 200 <= image.shape[1] <= 30000
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 10  # not one colour


def test_png_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(inspect_view.InspectViewError, match=r"pip install 'gpt-sql\[png\]'"):
        inspect_view.render_png(fake(1, 1, 2), text_of, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
