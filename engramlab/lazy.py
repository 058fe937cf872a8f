"""Package faces that import a name's module only when the name is first used (PEP 562).

A package's ``__init__`` runs whenever any of its modules is imported: the command line imports
``engramlab.locate.dkn.config`` to build its flags, and that must not import torch through
``engramlab/locate/dkn/__init__.py``. So the packages that re-export heavy names declare them as
{name: module} and call ``lazy_exports``.
"""

from __future__ import annotations

import importlib
import sys
import types


def lazy_exports(package: str, table: dict[str, str], functions: tuple[str, ...] = ()) -> None:
    """Give ``package`` a ``__getattr__`` / ``__dir__`` serving ``table``'s names and its submodules.

    ``functions`` are names that are both a submodule and a function defined in it (``prune`` in
    ``engramlab.locate.circuits.prune``): the package's attribute stays the function, as when the
    package imported it eagerly, even after the submodule is imported."""
    module = sys.modules[package]

    def __getattr__(name):
        if name in table:
            return getattr(importlib.import_module(table[name]), name)
        try:  # a submodule reached as an attribute (``engramlab.locate.dkn.clustering``)
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{package}.{name}":
                raise
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted([*vars(module), *table])

    module.__getattr__ = __getattr__
    module.__dir__ = __dir__
    if functions:
        class _Package(types.ModuleType):
            def __setattr__(self, attr, value):
                # The import system binds a submodule on its package once imported: keep the function.
                if attr in functions and isinstance(value, types.ModuleType):
                    value = getattr(value, attr)
                super().__setattr__(attr, value)

        module.__class__ = _Package
