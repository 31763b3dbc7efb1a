"""The documentation: every Python example in ``docs/`` runs, the parameter-count formulas of the
variant pages match ``count_params``, the generated tables are included, and the site builds in
strict mode (no warnings) with the API reference rendered from the docstrings."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import recurrent

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))


def python_blocks(path: pathlib.Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.S | re.M)


def load_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_page_examples_run(page, monkeypatch):
    """Each page's ```python blocks run top to bottom in one namespace (their asserts included)."""
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    blocks = python_blocks(page)
    if page.parent.name == "variants":
        assert blocks, f"{page.name} has no runnable example"
    namespace: dict = {"__name__": f"docs.{page.stem}"}
    for code in blocks:
        exec(compile(code, str(page), "exec"), namespace)


def test_every_variant_has_a_page_with_the_sections():
    nav = (ROOT / "mkdocs.yml").read_text()
    for name in ("lstm", "peephole_lstm", "cifg_lstm", "gru", "conv_lstm", "conv_gru", "bidirectional", "stacked"):
        page = DOCS / "variants" / f"{name}.md"
        assert f"variants/{name}.md" in nav
        text = page.read_text()
        for section in ("## Equations", "## Parameter count", "## When to use it", "## Example", "## Papers"):
            assert section in text, f"{page.name} lacks {section!r}"


FORMULAS = {  # the formulas the variant pages give, for input F (or channels C), hidden H
    "lstm": (lambda H: recurrent.lstm(H), lambda F, H: 4 * H * (F + H + 1)),
    "peephole_lstm": (lambda H: recurrent.peephole_lstm(H), lambda F, H: 4 * H * (F + H + 1) + 3 * H),
    "cifg_lstm": (lambda H: recurrent.cifg_lstm(H), lambda F, H: 3 * H * (F + H + 1)),
    "cifg_lstm+peephole": (lambda H: recurrent.cifg_lstm(H, peephole=True), lambda F, H: 3 * H * (F + H + 1) + 2 * H),
    "gru": (lambda H: recurrent.gru(H), lambda F, H: 3 * H * (F + H + 1) + H),
    "gru, reset_after=False": (lambda H: recurrent.gru(H, reset_after=False), lambda F, H: 3 * H * (F + H + 1)),
    "bidirectional lstm": (lambda H: recurrent.bidirectional(recurrent.lstm(H)), lambda F, H: 8 * H * (F + H + 1)),
    "stacked lstm x3": (
        lambda H: recurrent.stacked([recurrent.lstm(H)] * 3),
        lambda F, H: 4 * H * (F + H + 1) + 2 * 4 * H * (2 * H + 1),
    ),
}


@pytest.mark.parametrize("name", list(FORMULAS))
@pytest.mark.parametrize("F,H", [(1, 1), (7, 5), (32, 64)])
def test_parameter_count_formulas(name, F, H):
    make, formula = FORMULAS[name]
    assert recurrent.count_params(make(H).init(jax.random.key(0), (F,))) == formula(F, H)


@pytest.mark.parametrize("kernel", [(3,), (3, 5)])
def test_conv_parameter_count_formulas(kernel):
    C, H = 3, 4
    k = int(np.prod(kernel))
    shape = (6,) * len(kernel) + (C,)
    key = jax.random.key(0)
    assert recurrent.count_params(recurrent.conv_lstm(H, kernel).init(key, shape)) == 4 * H * (k * (C + H) + 1)
    assert recurrent.count_params(recurrent.conv_gru(H, kernel).init(key, shape)) == 3 * H * (k * (C + H) + 1) + H
    peephole = recurrent.conv_lstm(H, kernel, peephole=True).init(key, shape)
    assert recurrent.count_params(peephole) == 4 * H * (k * (C + H) + 1) + 3 * 6 ** len(kernel) * H


def test_generated_table_absent_says_how_to_make_it(tmp_path):
    hooks = load_hooks()
    assert "python -m experiments.variants" in hooks.variants_summary(tmp_path)
    assert "python -m benchmarks.suite" in hooks.benchmarks(tmp_path)
    headings = [line for line in hooks.benchmarks(tmp_path).splitlines() if line.startswith("#")]
    assert "### `suite.py`: the suite, against PyTorch, Flax and Keras 3 in one process" in headings
    assert not any(line.startswith("# ") for line in headings)  # the README's headings go one level down


def test_mkdocs_build_strict_includes_generated_results(tmp_path):
    """``mkdocs build --strict`` succeeds without warnings and includes the main job's table, written
    here by the main job's own writer (experiments.variants.write_outputs) with made-up rows."""
    from experiments import variants

    runs = tmp_path / "runs"
    config = variants.pipeline.override(variants.quick_config(), workdir=str(runs / "variants"), steps=4)
    row = {k: 0 for k in variants.COLUMNS} | {"variant": "lstm", "task": "made_up_variant_row", "gates": "ifgo"}
    curve = [(s, float(v)) for s, v in zip(range(4), np.linspace(1.0, 0.5, 4))]
    variants.write_outputs(config, [row], {"lstm": {"train": curve, "valid": curve}}, "made-up data")
    assert (runs / "variants" / "summary.md").is_file()

    site = tmp_path / "site"
    env = os.environ | {"RECURRENT_DOCS_RUNS": str(runs), "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr, result.stderr

    results_page = (site / "results" / "index.html").read_text()
    assert "made_up_variant_row" in results_page
    assert (site / "generated" / "variants_loss_curves.png").is_file()
    assert "generated/variants_loss_curves.png" in results_page

    api = (site / "api" / "index.html").read_text()
    for name in recurrent.__all__:
        assert f'id="recurrent.{name}"' in api, f"recurrent.{name} missing from the API reference"
    assert "\\begin{aligned}" in api and ":class:" not in api  # docstring math and roles converted
    assert 'id="recurrent.interop.from_torch"' in api and 'id="recurrent.nnx.LSTM"' in api

    benchmarks_page = (site / "benchmarks" / "index.html").read_text()
    assert "techniques.py" in benchmarks_page
