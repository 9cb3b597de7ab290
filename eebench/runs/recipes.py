"""Run configs: packaged recipes (``recipes/*.yaml``), YAML files, flags and ``key=value``
overrides merged into one ``RunConfig``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eebench.errors import EebenchError
from eebench.runs.config import RunConfig


def run_config_from(args: dict[str, Any], config_file: str | None, overrides: list[str]) -> RunConfig:
    """Merge defaults < config file < command-line flags < ``key=value`` overrides."""
    import yaml

    data: dict[str, Any] = {}
    per_task: dict[str, dict[str, Any]] = {}
    if config_file:
        loaded = load_config_file(config_file)
        per_task = loaded.pop("per_task", None) or {}
        loaded.pop("description", None)
        data.update(loaded)
    given: dict[str, Any] = {k: v for k, v in args.items() if v is not None}
    for ov in overrides:
        if "=" not in ov:
            raise EebenchError(f"override {ov!r} is not key=value (e.g. epochs=2 or cosee.alpha=0.01)")
        k, v = ov.split("=", 1)
        val = yaml.safe_load(v) if v else None
        if "." in k:  # method hyper-parameter: cosee.alpha=0.01
            m, hp = k.split(".", 1)
            given.setdefault("method_params", {}).setdefault(m, {})[hp] = val
        else:
            given[k] = val
    # A recipe's per-task values (e.g. the lr that makes RTE learn) sit between the recipe's
    # own values and what the user gave explicitly.
    task = given.get("task", data.get("task", RunConfig.model_fields["task"].default))
    if isinstance(task, str) and task in per_task:
        extra = dict(per_task[task])
        mp = extra.pop("method_params", None)
        data.update(extra)
        if mp:
            for m, hp in mp.items():
                data.setdefault("method_params", {}).setdefault(m, {}).update(hp)
    for k, v in given.items():
        if k == "method_params":
            for m, hp in v.items():
                data.setdefault("method_params", {}).setdefault(m, {}).update(hp)
        else:
            data[k] = v
    from pydantic import ValidationError

    try:
        return RunConfig(**data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        known = ", ".join(RunConfig.model_fields)
        if err["type"] == "extra_forbidden":
            raise EebenchError(f"bad config value for {loc!r}: {err['msg']}; known keys: {known}") from None
        name = str(err["loc"][0]) if err["loc"] else loc
        flag = f"--{name.replace('_', '-')} ({name})" if name in RunConfig.model_fields else repr(loc)
        raise EebenchError(f"bad value {err.get('input')!r} for {flag}: {err['msg']}") from None


def list_recipes() -> dict[str, str]:
    """Packaged recipes (``recipes/*.yaml``): name -> one-line description."""
    from importlib import resources

    import yaml

    out = {}
    for f in sorted(resources.files("eebench.recipes").iterdir(), key=lambda f: f.name):
        if f.name.endswith(".yaml"):
            out[f.name[: -len(".yaml")]] = str((yaml.safe_load(f.read_text()) or {}).get("description", ""))
    return out


def load_config_file(name_or_path: str) -> dict[str, Any]:
    """A run config: a YAML file's path, or the name of a packaged recipe (``paper``, ``cpu``)."""
    from importlib import resources

    import yaml

    p = Path(name_or_path)
    if p.exists():
        text, where = p.read_text(), str(p)
    elif name_or_path in list_recipes():
        text, where = (resources.files("eebench.recipes") / f"{name_or_path}.yaml").read_text(), f"recipe {name_or_path}"
    else:
        raise EebenchError(f"config {name_or_path!r} is neither a file nor a recipe; recipes: "
                           f"{', '.join(list_recipes())}")
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise EebenchError(f"config {where} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise EebenchError(f"config {where} must be a mapping of key: value")
    pt = loaded.get("per_task")
    if pt is not None and not (isinstance(pt, dict) and all(isinstance(v, dict) for v in pt.values())):
        raise EebenchError(f"config {where}: per_task must map task names to mappings of key: value")
    return loaded
