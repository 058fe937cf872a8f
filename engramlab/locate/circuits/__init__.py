"""Circuits: which edges of the head/MLP graph carry a fact from the prompt to the answer.

``find_circuit(lm, facts, config) -> CircuitResult`` scores every edge with EAP-IG (or EAP, or
clean-corrupted), keeps the best ones, and evaluates the circuit on held-out facts. The parts:

=============  ================================================================================
module         concern
=============  ================================================================================
graph          nodes, reader slots and edges as index maps and masks (``CircuitGraph``)
data           clean/corrupted pairs: filtering, discovery/evaluation split, token batches
hooks          writer outputs, reader inputs, the norm Jacobian
attribute      edge scores (EAP, EAP-IG over input embeddings, clean-corrupted)
prune          top-N, threshold, greedy growth; reachability cleanup
evaluate       faithfulness, Hit@10 and faithfulness-vs-N under a named ablation
components     head roles (mover / relation / mixture) and the logit lens
draw           DOT / SVG drawing
store          files of a result; the EAP-IG JSON layout
find           ``CircuitConfig``, ``CircuitResult``, ``find_circuit``
=============  ================================================================================
"""

import importlib
import sys
import types

# name -> the module defining it. PEP 562: the package is imported whenever one of its modules is
# (``engramlab.locate.circuits.config`` by the command line, too), so nothing heavy is imported until a name is asked for.
_LAZY = {
    "ABLATIONS": "engramlab.locate.circuits.config", "METHODS": "engramlab.locate.circuits.config",
    "METRICS": "engramlab.locate.circuits.config", "CircuitConfig": "engramlab.locate.circuits.config",
    "attribute_batch": "engramlab.locate.circuits.attribute",
    "attribute_edges": "engramlab.locate.circuits.attribute",
    "CircuitEvaluator": "engramlab.locate.circuits.evaluate",
    "CircuitResult": "engramlab.locate.circuits.find", "find_circuit": "engramlab.locate.circuits.find",
    "CircuitGraph": "engramlab.locate.circuits.graph", "edge_count": "engramlab.locate.circuits.graph",
    "circuit_nodes": "engramlab.locate.circuits.prune", "greedy": "engramlab.locate.circuits.prune",
    "prune": "engramlab.locate.circuits.prune", "prune_unreachable": "engramlab.locate.circuits.prune",
    "top_n": "engramlab.locate.circuits.prune",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    try:  # a submodule (``engramlab.locate.circuits.store``) reached as an attribute
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    """Importing the submodule ``prune`` binds it on the package; the package's ``prune`` is the
    function of that name (as when this file imported it eagerly), so keep that bound instead."""

    def __setattr__(self, attr, value):
        if attr == "prune" and isinstance(value, types.ModuleType):
            value = getattr(value, attr)
        super().__setattr__(attr, value)


sys.modules[__name__].__class__ = _Package


def __dir__():
    return sorted([*globals(), *_LAZY])


__all__ = [
    "ABLATIONS", "METHODS", "METRICS", "CircuitConfig", "CircuitEvaluator", "CircuitGraph", "CircuitResult",
    "attribute_batch", "attribute_edges", "circuit_nodes", "edge_count", "find_circuit", "greedy", "prune",
    "prune_unreachable", "top_n",
]
