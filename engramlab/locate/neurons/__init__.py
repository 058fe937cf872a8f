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

from engramlab.locate.neurons.effects import ENHANCE, SUPPRESS, measure_effects
from engramlab.locate.neurons.find import (NeuronConfig, NeuronResult, apply_refinement, attribute_neurons,
                                           find_knowledge_neurons)
from engramlab.locate.neurons.select import (P_STEP, coarse_neurons, consistency, refine_neurons,
                                             refine_relation_dai, relation_neurons)
from engramlab.models.scoring import first_token_ranks, intervene, target_probabilities, target_probability

__all__ = [
    "ENHANCE", "NeuronConfig", "NeuronResult", "P_STEP", "SUPPRESS", "apply_refinement", "attribute_neurons",
    "coarse_neurons", "consistency", "find_knowledge_neurons", "first_token_ranks", "intervene",
    "measure_effects", "refine_neurons", "refine_relation_dai", "relation_neurons", "target_probabilities",
    "target_probability",
]
