"""How the optional native kernel is found, built and refused (:mod:`recurrent.native.build`).

These run with and without the ``native`` extra: each makes the environment it tests (no oneDNN,
no compiler, a compiler that fails, a changed source) by patching, and checks the reason that
``rnn(..., implementation="native")`` gives, or the cache key.
"""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import pytest

import recurrent
from recurrent import native
from recurrent.native import build

H, F, B, T = 4, 3, 2, 5


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """No library configured or installed, an empty cache, a fresh fingerprint and load state."""
    monkeypatch.delenv("RECURRENT_NATIVE_LIBRARY", raising=False)
    monkeypatch.setenv("RECURRENT_NATIVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native.importlib.util, "find_spec", lambda name: None)
    build.fingerprint.cache_clear()
    native._built.cache_clear()
    yield tmp_path
    build.fingerprint.cache_clear()
    native._built.cache_clear()


def _fallback_message():
    cell = recurrent.lstm(H)
    params = cell.init(jax.random.key(0), (F,))
    with pytest.warns(recurrent.FallbackWarning) as record:
        recurrent.rnn(cell, implementation="native").apply(params, jnp.ones((B, T, F)))
    return str(record[0].message)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the native kernel's reasons are checked on CPU")
def test_without_onednn_the_reason_names_the_extra(fresh, monkeypatch):
    monkeypatch.setattr(build, "onednn_prefix", lambda: None)
    monkeypatch.setattr(native, "onednn_prefix", lambda: None)
    assert "oneDNN" in build.missing() and 'pip install "recurrent[native]"' in build.missing()
    message = _fallback_message()
    assert "cannot be here" in message and "recurrent[native]" in message


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the native kernel's reasons are checked on CPU")
@pytest.mark.skipif(build.onednn_prefix() is None, reason="needs oneDNN's headers (the native extra)")
def test_without_a_compiler_the_reason_says_so(fresh, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert "no C++ compiler" in build.missing() and "$CXX" in build.missing()
    assert "no C++ compiler" in _fallback_message()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the native kernel's reasons are checked on CPU")
@pytest.mark.skipif(build.onednn_prefix() is None, reason="needs oneDNN's headers (the native extra)")
def test_a_failing_compiler_is_reported_and_nothing_is_cached(fresh, monkeypatch):
    monkeypatch.setenv("CXX", "false")  # on PATH, exits 1
    assert build.missing() is None
    message = native.reason()
    assert message is not None and "did not compile" in message and "false exited with 1" in message
    assert not list((fresh / "cache").glob("*.so"))


@pytest.mark.skipif(build.onednn_prefix() is None, reason="needs oneDNN's headers (the native extra)")
def test_the_cache_key_changes_with_the_sources(fresh, monkeypatch):
    copy = fresh / "src"
    shutil.copytree(build.HERE, copy, ignore=shutil.ignore_patterns("_build", "__pycache__"))
    monkeypatch.setattr(build, "HERE", copy)
    monkeypatch.setattr(build, "SOURCES", sorted(copy.glob("*.cc")))
    first = build.cached_library()
    assert first.parent == fresh / "cache" and first.name.startswith("librecurrent_native-")
    build.fingerprint.cache_clear()
    assert build.cached_library() == first  # the same sources, the same key
    with open(copy / "common.h", "a") as f:
        f.write("\n// an edit\n")
    build.fingerprint.cache_clear()
    assert build.cached_library() != first


def test_a_configured_library_that_is_missing_is_named(monkeypatch, tmp_path):
    missing = tmp_path / "missing.so"
    monkeypatch.setenv("RECURRENT_NATIVE_LIBRARY", str(missing))
    assert native.library_path() == missing
    if jax.default_backend() == "cpu":
        assert str(missing) in native.reason() and "RECURRENT_NATIVE_LIBRARY" in native.reason()
