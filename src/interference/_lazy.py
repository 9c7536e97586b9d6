"""Package attributes that load with their module on first use (PEP 562): a package whose
light parts (the task registry, the join of saved heatmaps) are read where torch is not
needed, e.g. in the Snakemake process or a job that only moves arrays."""
from __future__ import annotations

import importlib


def lazy_exports(package: str, where: dict[str, tuple[str, ...]]):
    """(``__getattr__``, ``__dir__``, ``__all__``) for package ``package`` whose public names
    live in its modules: ``where`` maps a relative module (".tasks") to the names it defines.
    A name is imported from its module on first access and then cached in the package."""
    module_of = {name: module for module, names in where.items() for name in names}
    names = sorted(module_of)
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str):
        module = module_of.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__, names
