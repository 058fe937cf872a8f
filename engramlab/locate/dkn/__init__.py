"""Degenerate knowledge neurons (Chen et al., 2024): groups of neurons that each can carry a fact alone.

===============  ==================================================================================
module           concern
===============  ==================================================================================
config           ``DKNConfig``, ``ClusterConfig``, ``EvolveConfig`` and the names of their choices
                 (no torch, no scipy: the command line reads them)
graph            neuron distances from the weights: 1 / |w_out_A . r_B| (norm folded in)
clustering       persistent-homology clustering and the other methods (``cluster_neurons``)
search           the enforced DKN test over subsets of clusters (``search_dkn``)
suppression      P(target) with neuron sets scaled, many sets per forward pass
robustness       perturbed queries with the DKN attenuated / enhanced
find             ``DKNResult``, ``find_degenerate_neurons`` (alias ``find_dkns``)
evolvability     learning new facts through the DKN vs other neurons (``evaluate_evolvability``,
                 ``EvolvabilityResult``)
===============  ==================================================================================
"""

from engramlab.lazy import lazy_exports

# name -> the module defining it. PEP 562: the package runs whenever one of its modules is
# imported (``engramlab.locate.dkn.config`` by the command line, too), so a name's module is
# imported only when the name is first asked for.
_LAZY = {
    "METHODS": "engramlab.locate.dkn.config", "ClusterConfig": "engramlab.locate.dkn.config",
    "DKNConfig": "engramlab.locate.dkn.config",
    "cluster_neurons": "engramlab.locate.dkn.clustering", "persistence_diagram": "engramlab.locate.dkn.clustering",
    "DKNResult": "engramlab.locate.dkn.find", "FactProbe": "engramlab.locate.dkn.find",
    "analyse_fact": "engramlab.locate.dkn.find", "candidate_neurons": "engramlab.locate.dkn.find",
    "find_degenerate_neurons": "engramlab.locate.dkn.find", "find_dkns": "engramlab.locate.dkn.find",
    "ig_attribution": "engramlab.locate.dkn.find", "method_summary": "engramlab.locate.dkn.find",
    "neuron_distances": "engramlab.locate.dkn.graph", "reader_inv_rms": "engramlab.locate.dkn.graph",
    "read_vectors": "engramlab.locate.dkn.graph",
    "perturb": "engramlab.locate.dkn.robustness", "robustness": "engramlab.locate.dkn.robustness",
    "Search": "engramlab.locate.dkn.search", "SubsetSearch": "engramlab.locate.dkn.search",
    "search_dkn": "engramlab.locate.dkn.search",
    "scaled_target_probs": "engramlab.locate.dkn.suppression",
}
lazy_exports(__name__, _LAZY, functions=('robustness',))

__all__ = [
    "METHODS", "ClusterConfig", "DKNConfig", "DKNResult", "FactProbe", "Search", "SubsetSearch", "analyse_fact",
    "candidate_neurons", "cluster_neurons", "find_degenerate_neurons", "find_dkns", "ig_attribution",
    "method_summary", "neuron_distances", "persistence_diagram", "perturb", "read_vectors", "reader_inv_rms",
    "robustness", "scaled_target_probs", "search_dkn",
]
