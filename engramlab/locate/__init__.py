"""Locators: where a model keeps facts (see ``engramlab.locate.base`` for the shared contract).

``LOCATORS`` (name -> ``Locator``) is filled by ``engramlab.locate.registry`` on first use, so that
importing one locator's module does not import every other one.
"""

from engramlab.lazy import lazy_exports
from engramlab.locate.base import Locator, Result, select

# The registry imports every locator, so it loads only when asked for.
lazy_exports(__name__, {name: "engramlab.locate.registry" for name in ("LOCATORS", "get_locator", "register")})

__all__ = ["LOCATORS", "Locator", "Result", "get_locator", "register", "select"]
