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

import importlib
import sys
import types

# name -> the module defining it. PEP 562: the package is imported whenever one of its modules is
# (``engramlab.locate.dkn.config`` by the command line, too), so nothing heavy is imported until a name is asked for.
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


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    try:  # a submodule (``engramlab.locate.dkn.clustering``) reached as an attribute
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    """Importing the submodule ``robustness`` binds it on the package; the package's ``robustness`` is the
    function of that name (as when this file imported it eagerly), so keep that bound instead."""

    def __setattr__(self, attr, value):
        if attr == "robustness" and isinstance(value, types.ModuleType):
            value = getattr(value, attr)
        super().__setattr__(attr, value)


sys.modules[__name__].__class__ = _Package


def __dir__():
    return sorted([*globals(), *_LAZY])


__all__ = [
    "METHODS", "ClusterConfig", "DKNConfig", "DKNResult", "FactProbe", "Search", "SubsetSearch", "analyse_fact",
    "candidate_neurons", "cluster_neurons", "find_degenerate_neurons", "find_dkns", "ig_attribution",
    "method_summary", "neuron_distances", "persistence_diagram", "perturb", "read_vectors", "reader_inv_rms",
    "robustness", "scaled_target_probs", "search_dkn",
]
