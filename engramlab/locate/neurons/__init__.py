"""Knowledge neurons (Dai et al., 2022): which MLP neurons hold a fact, and what editing them does.

=========  ======================================================================================
module     concern
=========  ======================================================================================
ig         integrated gradients over every layer's MLP neurons, batched (and a plain reference)
select     coarse sets, refinement (per fact or Dai's per relation), relation neurons, consistency
effects    suppression / enhancement of the refined set, with same-relation, other-relation and
           random-neuron controls
find       ``NeuronConfig``, ``NeuronResult``, ``find_knowledge_neurons``
=========  ======================================================================================
"""

import importlib

# name -> the module defining it. PEP 562: the package is imported whenever one of its modules is
# (``engramlab.locate.neurons.config`` by the command line, too), so nothing heavy is imported until a name is asked for.
_LAZY = {
    "NeuronConfig": "engramlab.locate.neurons.config",
    "ENHANCE": "engramlab.locate.neurons.effects", "SUPPRESS": "engramlab.locate.neurons.effects",
    "measure_effects": "engramlab.locate.neurons.effects",
    "NeuronResult": "engramlab.locate.neurons.find", "apply_refinement": "engramlab.locate.neurons.find",
    "attribute_neurons": "engramlab.locate.neurons.find",
    "find_knowledge_neurons": "engramlab.locate.neurons.find",
    "P_STEP": "engramlab.locate.neurons.select", "coarse_neurons": "engramlab.locate.neurons.select",
    "consistency": "engramlab.locate.neurons.select", "refine_neurons": "engramlab.locate.neurons.select",
    "refine_relation_dai": "engramlab.locate.neurons.select",
    "relation_neurons": "engramlab.locate.neurons.select",
    "first_token_ranks": "engramlab.models.scoring", "intervene": "engramlab.models.scoring",
    "target_probabilities": "engramlab.models.scoring", "target_probability": "engramlab.models.scoring",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    try:  # a submodule (``engramlab.locate.neurons.ig``) reached as an attribute
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])


__all__ = [
    "ENHANCE", "P_STEP", "SUPPRESS", "NeuronConfig", "NeuronResult", "apply_refinement", "attribute_neurons",
    "coarse_neurons", "consistency", "find_knowledge_neurons", "first_token_ranks", "intervene",
    "measure_effects", "refine_neurons", "refine_relation_dai", "relation_neurons", "target_probabilities",
    "target_probability",
]
