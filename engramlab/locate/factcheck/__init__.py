"""Fact-checking with degenerate knowledge neurons: ``find_factcheck`` and its Result
(``engramlab.locate.factcheck.find``).

The config names are imported eagerly (they are light); the rest loads on first use so that the
command line, which builds its options from ``FactcheckConfig``, does not import torch at start-up.
"""

from engramlab.lazy import lazy_exports
from engramlab.locate.factcheck.config import CHECKERS, FORMS, FactcheckConfig

lazy_exports(__name__, {"FactcheckResult": "engramlab.locate.factcheck.find",
                        "find_factcheck": "engramlab.locate.factcheck.find"})

__all__ = ["CHECKERS", "FORMS", "FactcheckConfig", "FactcheckResult", "find_factcheck"]
