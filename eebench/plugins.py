"""Methods, signals, exit policies and head kinds from outside the package.

* ``--include DIR`` (as lm-evaluation-harness's include path): every ``*.py`` file in ``DIR``
  (not starting with ``_``) is imported once, in name order; what it registers shows in
  ``eebench list`` as ``include <file>``.
* Installed packages register through the entry-point group ``eebench.plugins``: each entry
  point is loaded (a module is imported; a callable is then called with no argument).

A file that fails to import is one clear ``EebenchError`` naming the file and the error.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path

from eebench.errors import EebenchError
from eebench.registry import registering_from

ENTRY_POINT_GROUP = "eebench.plugins"

_loaded_files: dict[str, str] = {}  # resolved path -> module name
_entry_points_loaded = False


def load_include(paths) -> list[str]:
    """Import every plugin file of each folder (or file) in ``paths``; returns the module names.
    Importing the same file twice is a no-op."""
    out = []
    for raw in paths or []:
        p = Path(raw).expanduser()
        if p.is_dir():
            files = sorted(f for f in p.glob("*.py") if not f.name.startswith("_"))
        elif p.is_file() and p.suffix == ".py":
            files = [p]
        else:
            raise EebenchError(f"--include {raw}: no such folder or .py file")
        for f in files:
            out.append(_import_file(f))
    return out


def _import_file(f: Path) -> str:
    key = str(f.resolve())
    if key in _loaded_files:
        return _loaded_files[key]
    # A stable, unique module name: two folders may both hold a ``my_method.py``.
    name = f"eebench_plugin_{f.stem}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, f)
    if spec is None or spec.loader is None:  # pragma: no cover - a .py file always has a loader
        raise EebenchError(f"plugin file {f} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses, pickling (Ray) and typing look modules up here
    try:
        with registering_from(f"include {f}"):
            spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - any error in a user's file is reported as one line
        sys.modules.pop(name, None)
        where = ""
        tb = e.__traceback__
        while tb is not None:  # the deepest frame inside the plugin file: the line to fix
            if tb.tb_frame.f_code.co_filename == str(f):
                where = f" (line {tb.tb_lineno})"
            tb = tb.tb_next
        raise EebenchError(f"plugin file {f} failed to import{where}: {type(e).__name__}: {e}") from None
    _loaded_files[key] = name
    return name


def load_entry_points() -> None:
    """Load every installed ``eebench.plugins`` entry point once."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(getattr(ep, "dist", None), "name", "?")
        try:
            with registering_from(f"entry point {ep.name} ({dist})"):
                obj = ep.load()
                if callable(obj) and not isinstance(obj, type):
                    obj()
        except Exception as e:  # noqa: BLE001
            raise EebenchError(f"plugin entry point {ep.name} ({dist}, {ep.value}) failed to load: "
                               f"{type(e).__name__}: {e}") from None
