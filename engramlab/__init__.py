"""engramlab: find where language models store facts, and watch that storage form in training.

The main names, importable from here (loaded on first use, so ``import engramlab`` stays cheap):

    load_model(spec)                      a local HF directory, .gguf file, run directory or alias
    load_facts(spec)                      a FactSet from files or bundled relations
    train(world, out, TrainConfig(...))   train a model on a synthetic biography world
    score_recall / find_knowledge_neurons / find_degenerate_neurons / find_circuit
                                          the locators: (lm, facts, config=None, *, progress=False)
    LOCATORS                              name -> Locator (config class, find, result class)
"""

__version__ = "0.1.0"

from engramlab.errors import EngramError  # noqa: E402
from engramlab.lazy import lazy_exports  # noqa: E402

_LAZY = {
    "load_model": "engramlab.models.loading",
    "wrap_model": "engramlab.models.loading",
    "load_facts": "engramlab.data.facts",
    "FactSet": "engramlab.data.facts",
    "train": "engramlab.train.trainer",
    "TrainConfig": "engramlab.train.config",
    "score_recall": "engramlab.recall",
    "RecallConfig": "engramlab.recall",
    "find_knowledge_neurons": "engramlab.locate.neurons.find",
    "NeuronConfig": "engramlab.locate.neurons.config",
    "find_degenerate_neurons": "engramlab.locate.dkn.find",
    "find_dkns": "engramlab.locate.dkn.find",
    "DKNConfig": "engramlab.locate.dkn.config",
    "find_circuit": "engramlab.locate.circuits.find",
    "CircuitConfig": "engramlab.locate.circuits.config",
    "LOCATORS": "engramlab.locate.registry",
    "select": "engramlab.locate.base",
}

lazy_exports(__name__, _LAZY)  # PEP 562: nothing heavy loads before a name is used

__all__ = ["EngramError", "__version__", *_LAZY]
