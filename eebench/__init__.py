"""eebench: a benchmark harness for early-exit transformer classifiers."""

__version__ = "0.1.0"

#: Version of the maths behind a result (signals, exit rule, speed-up, losses, sweeps, training
#: loop). It is part of every cell's identity: bump it in any change that alters the numbers a
#: given configuration produces, so that no cell trained by the older code is reused.
MATHS_VERSION = 1


def _map_checkout_packages() -> None:
    """In a source checkout, make ``methods/``, ``tasks/`` and ``recipes/`` importable as ``eebench.methods``,
    ``eebench.tasks`` and ``eebench.recipes``, as an installed wheel (or editable install) maps them. Without this, running
    from the repository root with the package installed non-editable (tox, CI) would import this
    folder, which has no ``methods`` sub-package."""
    import importlib.machinery
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for name in ("methods", "tasks", "recipes"):
        full = f"{__name__}.{name}"
        init = root / name / "__init__.py"
        if full in sys.modules or not init.exists():
            continue
        if importlib.machinery.PathFinder.find_spec(full, __path__) is not None:
            continue  # an installed package carries it
        spec = importlib.util.spec_from_file_location(full, init, submodule_search_locations=[str(init.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
        globals()[name] = module


_map_checkout_packages()
