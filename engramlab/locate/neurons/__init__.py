"""Knowledge neurons (Dai et al., 2022): which MLP neurons hold a fact, and what editing them does.

=========  ======================================================================================
module     concern
=========  ======================================================================================
config     ``NeuronConfig`` and the names of its choices (no torch: the command line reads it)
ig         integrated gradients over every layer's MLP neurons, batched (and a plain reference),
           with the completeness error and pass count (``integrated_gradients_run``)
static     the one-forward static score: each neuron's direct first-order contribution to log p
screen     attribution by method (ig | static | screen: the static score picks the layers IG verifies)
select     coarse sets, refinement (per fact or Dai's per relation), relation neurons, consistency
effects    suppression / enhancement of the refined set, with same-relation, other-relation and
           random-neuron controls
find       ``NeuronResult``, ``find_knowledge_neurons``
=========  ======================================================================================
"""

from engramlab.lazy import lazy_exports

# name -> the module defining it. PEP 562: the package runs whenever one of its modules is
# imported (``engramlab.locate.neurons.config`` by the command line, too), so a name's module is
# imported only when the name is first asked for.
_LAZY = {
    "NeuronConfig": "engramlab.locate.neurons.config",
    "ENHANCE": "engramlab.locate.neurons.effects", "SUPPRESS": "engramlab.locate.neurons.effects",
    "measure_effects": "engramlab.locate.neurons.effects",
    "NeuronResult": "engramlab.locate.neurons.find", "apply_refinement": "engramlab.locate.neurons.find",
    "attribute_neurons": "engramlab.locate.neurons.find",
    "attribute_prompt": "engramlab.locate.neurons.screen", "screen_layers": "engramlab.locate.neurons.screen",
    "static_scores": "engramlab.locate.neurons.static",
    "find_knowledge_neurons": "engramlab.locate.neurons.find",
    "P_STEP": "engramlab.locate.neurons.select", "coarse_neurons": "engramlab.locate.neurons.select",
    "consistency": "engramlab.locate.neurons.select", "refine_neurons": "engramlab.locate.neurons.select",
    "refine_relation_dai": "engramlab.locate.neurons.select",
    "relation_neurons": "engramlab.locate.neurons.select",
    "first_token_ranks": "engramlab.models.scoring", "intervene": "engramlab.models.scoring",
    "target_probabilities": "engramlab.models.scoring", "target_probability": "engramlab.models.scoring",
}
lazy_exports(__name__, _LAZY)

__all__ = [
    "ENHANCE", "P_STEP", "SUPPRESS", "NeuronConfig", "NeuronResult", "apply_refinement", "attribute_neurons",
    "attribute_prompt", "screen_layers", "static_scores",
    "coarse_neurons", "consistency", "find_knowledge_neurons", "first_token_ranks", "intervene",
    "measure_effects", "refine_neurons", "refine_relation_dai", "relation_neurons", "target_probabilities",
    "target_probability",
]
