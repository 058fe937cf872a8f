"""Each registered locator's config class, by name, without importing torch.

The command line builds ``engram evolve``'s per-analysis settings (``--set circuit.top_n=300``)
from this table; ``registry.LOCATORS`` holds the same classes (tests/test_locators.py checks the
two agree, so a new locator is added in both places or the suite fails).
"""

from __future__ import annotations

from engramlab.locate.circuits.config import CircuitConfig
from engramlab.locate.dkn.config import DKNConfig
from engramlab.locate.factcheck.config import FactcheckConfig
from engramlab.locate.neurons.config import NeuronConfig
from engramlab.locate.regions.config import RegionConfig
from engramlab.locate.trace.config import TraceConfig
from engramlab.recall import RecallConfig

LOCATOR_CONFIGS: dict[str, type] = {"recall": RecallConfig, "neurons": NeuronConfig, "dkn": DKNConfig,
                                    "circuit": CircuitConfig, "regions": RegionConfig,
                                    "trace": TraceConfig, "factcheck": FactcheckConfig}

__all__ = ["LOCATOR_CONFIGS"]
