"""Locators: where a model keeps facts (see ``engramlab.locate.base`` for the shared contract).

``LOCATORS`` (name -> ``Locator``) is filled by ``engramlab.locate.registry`` on first use, so that
importing one locator's module does not import every other one.
"""

from engramlab.locate.base import Locator, Result, select


def __getattr__(name):  # PEP 562: the registry imports every locator, so load it only when asked
    if name in ("LOCATORS", "get_locator", "register"):
        from engramlab.locate import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'engramlab.locate' has no attribute {name!r}")


__all__ = ["LOCATORS", "Locator", "Result", "get_locator", "register", "select"]
