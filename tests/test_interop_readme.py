"""The README's "Coming from PyTorch / Keras / Flax" examples run as written."""

from __future__ import annotations

import os
import pathlib
import re

import pytest

pytest.importorskip("torch")
pytest.importorskip("keras")


def test_readme_interop_examples():
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = text[text.index("## Coming from PyTorch") : text.index("## Layout")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 3
    os.environ.setdefault("KERAS_BACKEND", "jax")
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
