"""methods/ and tasks/ ship inside the eebench namespace, never as top-level packages."""

import zipfile

import pytest


def test_wheel_maps_methods_and_tasks_under_eebench(tmp_path):
    build_meta = pytest.importorskip("setuptools.build_meta")
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cwd = os.getcwd()
    os.chdir(root)
    try:
        name = build_meta.build_wheel(str(tmp_path))
    finally:
        os.chdir(cwd)
    names = zipfile.ZipFile(tmp_path / name).namelist()
    assert {"eebench/methods/cosee.py", "eebench/tasks/sst2.yaml", "eebench/recipes/paper.yaml", "eebench/recipes/cpu.yaml"} <= set(names)
    assert not [n for n in names if n.startswith(("methods/", "tasks/", "recipes/", "tests/", "benchmarks/"))]
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert entry and "eebench = eebench.cli:main" in zipfile.ZipFile(tmp_path / name).read(entry[0]).decode()


def test_checkout_imports_methods_and_tasks():
    import importlib.resources

    import eebench.methods.cosee
    import eebench.tasks

    assert hasattr(eebench.methods.cosee, "cosee_loss")
    assert (importlib.resources.files("eebench.tasks") / "sst2.yaml").is_file()
