"""Causal tracing (Meng et al. 2022): ``find_trace`` and its Result (``engramlab.locate.trace.find``).

The config names are imported eagerly (they are light); the rest loads on first use so that the
command line, which builds its options from ``TraceConfig``, does not import torch at start-up.
"""

from engramlab.lazy import lazy_exports
from engramlab.locate.trace.config import KINDS, TOKEN_KINDS, TraceConfig

lazy_exports(__name__, {"TraceResult": "engramlab.locate.trace.find", "find_trace": "engramlab.locate.trace.find"})

__all__ = ["KINDS", "TOKEN_KINDS", "TraceConfig", "TraceResult", "find_trace"]
