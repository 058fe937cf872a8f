"""Circuits: which edges of the head/MLP graph carry a fact from the prompt to the answer.

``find_circuit(lm, facts, config) -> CircuitResult`` scores every edge with EAP-IG (or EAP, or
clean-corrupted), keeps the best ones, and evaluates the circuit on held-out facts. The parts:

=============  ================================================================================
module         concern
=============  ================================================================================
config         ``CircuitConfig`` and the names of its choices (no torch: the command line reads it)
graph          nodes, reader slots and edges as index maps and masks (``CircuitGraph``)
data           clean/corrupted pairs: filtering, discovery/evaluation split, token batches
hooks          writer outputs, reader inputs, the norm Jacobian
attribute      edge scores (EAP, EAP-IG over input embeddings, clean-corrupted)
prune          top-N, threshold, greedy growth; reachability cleanup
evaluate       faithfulness, Hit@10 and faithfulness-vs-N under a named ablation
mib            the MIB scores CPR and CMD over a sweep of edge fractions
components     head roles (mover / relation / mixture) and the logit lens
draw           DOT / SVG drawing
store          files of a result; the EAP-IG JSON layout
find           ``CircuitResult``, ``find_circuit``
=============  ================================================================================
"""

from engramlab.lazy import lazy_exports

# name -> the module defining it. PEP 562: the package runs whenever one of its modules is
# imported (``engramlab.locate.circuits.config`` by the command line, too), so a name's module is
# imported only when the name is first asked for.
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
lazy_exports(__name__, _LAZY, functions=('prune',))

__all__ = [
    "ABLATIONS", "METHODS", "METRICS", "CircuitConfig", "CircuitEvaluator", "CircuitGraph", "CircuitResult",
    "attribute_batch", "attribute_edges", "circuit_nodes", "edge_count", "find_circuit", "greedy", "prune",
    "prune_unreachable", "top_n",
]
