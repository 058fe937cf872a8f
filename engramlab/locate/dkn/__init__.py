"""Degenerate knowledge neurons (Chen et al., 2024): groups of neurons that each can carry a fact alone.

===============  ==================================================================================
module           concern
===============  ==================================================================================
graph            neuron distances from the weights: 1 / |w_out_A . r_B| (norm folded in)
clustering       persistent-homology clustering and the other methods (``ClusterConfig``)
search           the enforced DKN test over subsets of clusters (``search_dkn``)
suppression      P(target) with neuron sets scaled, many sets per forward pass
robustness       perturbed queries with the DKN attenuated / enhanced
find             ``DKNConfig``, ``DKNResult``, ``find_degenerate_neurons`` (alias ``find_dkns``)
evolvability     learning new facts through the DKN vs other neurons (``EvolveConfig``,
                 ``evaluate_evolvability``, ``EvolvabilityResult``)
===============  ==================================================================================
"""

from engramlab.locate.dkn.clustering import METHODS, ClusterConfig, cluster_neurons, persistence_diagram
from engramlab.locate.dkn.find import (DKNConfig, DKNResult, FactProbe, analyse_fact, candidate_neurons,
                                       find_degenerate_neurons, find_dkns, ig_attribution, method_summary)
from engramlab.locate.dkn.graph import neuron_distances, reader_inv_rms, read_vectors
from engramlab.locate.dkn.robustness import perturb, robustness
from engramlab.locate.dkn.search import Search, SubsetSearch, search_dkn
from engramlab.locate.dkn.suppression import scaled_target_probs

__all__ = [
    "METHODS", "ClusterConfig", "DKNConfig", "DKNResult", "FactProbe", "Search", "SubsetSearch", "analyse_fact",
    "candidate_neurons", "cluster_neurons", "find_degenerate_neurons", "find_dkns", "ig_attribution",
    "method_summary", "neuron_distances", "persistence_diagram", "perturb", "read_vectors", "reader_inv_rms",
    "robustness", "scaled_target_probs", "search_dkn",
]
