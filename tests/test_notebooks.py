"""Every notebook in ``notebooks/`` executes top to bottom on CPU at its small size (as CI runs it),
and the committed ``.ipynb`` files are exactly what ``notebooks/build_notebooks.py`` writes."""

from __future__ import annotations

import importlib.util
import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def load_builder():
    spec = importlib.util.spec_from_file_location("build_notebooks", NOTEBOOKS / "build_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILDER = load_builder()


def test_committed_notebooks_match_their_source():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(BUILDER.NOTEBOOKS)
    for name in BUILDER.NOTEBOOKS:
        assert (NOTEBOOKS / name).read_text() == BUILDER.text(name), (
            f"{name} differs from notebooks/build_notebooks.py: run `python notebooks/build_notebooks.py`"
        )
        nbformat.validate(nbformat.read(NOTEBOOKS / name, as_version=4))


def test_notebooks_use_only_the_public_api():
    for name in BUILDER.NOTEBOOKS:
        source = "\n".join(c.source for c in BUILDER.build(name).cells if c.cell_type == "code")
        assert "recurrent._" not in source and "from recurrent._" not in source, name
        assert "experiments" not in source.replace("experiments.search", ""), name
        assert 'os.environ.get("RECURRENT_NOTEBOOK_SIZE", "full")' in source, name


# What each notebook must print at the small size, beyond running without an error.
EXPECTED = {
    "01_quickstart.ipynb": ["padded outputs are zero: True", "two chunks == one pass: True", "loss: first"],
    "02_variants.ipynb": ["by hand == cell.step: True"] * 4 + ["stacked lstm x2"],
    "03_hyperparameter_search.ipynb": ["losses (8, 30)", "binned main effect", "fANOVA (optuna)"],
    "04_video_prediction.ipynb": ["loss: first"],
    # Two simulated CPU devices, so the sharding of the population is exercised.
    "05_colab_tpu.ipynb": ["2 cpu device(s)", "cpu:0: members 0..1", "cpu:1: members 2..3"],
}


@pytest.mark.parametrize("name", sorted(BUILDER.NOTEBOOKS))
def test_notebook_runs(name, tmp_path, monkeypatch):
    monkeypatch.setenv("RECURRENT_NOTEBOOK_SIZE", "small")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    # The kernel imports this checkout's package whatever is installed (and runs in tmp_path).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if name.startswith("05"):
        flags = os.environ.get("XLA_FLAGS", "")
        monkeypatch.setenv("XLA_FLAGS", f"{flags} --xla_force_host_platform_device_count=2".strip())
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    text += "".join(o.get("data", {}).get("text/plain", "") for o in outputs if "data" in o)
    for expected in set(EXPECTED[name]):
        assert text.count(expected) >= EXPECTED[name].count(expected), f"{name}: {expected!r} not printed"
    assert "MISMATCH" not in text
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{name} shows no plot"


def test_colab_install_cell_installs_an_uploaded_wheel_or_a_git_url_and_else_says_how(tmp_path, monkeypatch):
    """The install branch of notebook 05's first code cell, which the runs above skip (``recurrent`` is
    importable there): run with ``recurrent`` not importable and ``pip`` replaced by a recorder."""
    import subprocess
    import sys

    source = BUILDER.build("05_colab_tpu.ipynb").cells[1].source
    assert 'GIT_URL = ""' in source
    import recurrent as real

    calls = []

    def pip(argv, check):
        calls.append(argv)
        sys.modules["recurrent"] = real  # "installed"
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(subprocess, "run", pip)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "recurrent", None)  # import recurrent raises ImportError
    with pytest.raises(RuntimeError, match=r"(?s)nothing to install it from.*pip wheel \. --no-deps -w dist"):
        exec(source, {})
    assert calls == []

    git = source.replace('GIT_URL = ""', 'GIT_URL = "https://example.org/someone/recurrent.git"')
    exec(git, {})
    assert calls[-1] == [sys.executable, "-m", "pip", "install", "-q", "git+https://example.org/someone/recurrent.git"]

    sys.modules["recurrent"] = None
    wheel = tmp_path / "recurrent-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    exec(git, {})  # an uploaded wheel comes first
    assert calls[-1] == [sys.executable, "-m", "pip", "install", "-q", os.path.join(".", wheel.name)]
    assert len(calls) == 2
