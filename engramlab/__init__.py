"""engramlab: find where language models store facts, and watch that storage form in training."""

__version__ = "0.1.0"

from engramlab.errors import EngramError  # noqa: E402

__all__ = ["EngramError", "__version__"]
