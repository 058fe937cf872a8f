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

from engramlab.locate.circuits.attribute import METHODS, METRICS, attribute_batch, attribute_edges
from engramlab.locate.circuits.evaluate import ABLATIONS, CircuitEvaluator
from engramlab.locate.circuits.find import CircuitConfig, CircuitResult, find_circuit
from engramlab.locate.circuits.graph import CircuitGraph, edge_count
from engramlab.locate.circuits.prune import circuit_nodes, greedy, prune, prune_unreachable, top_n

__all__ = [
    "ABLATIONS", "METHODS", "METRICS", "CircuitConfig", "CircuitEvaluator", "CircuitGraph", "CircuitResult",
    "attribute_batch", "attribute_edges", "circuit_nodes", "edge_count", "find_circuit", "greedy", "prune",
    "prune_unreachable", "top_n",
]
