"""Issue 11, item 8: the redesigned core reproduces the numbers of the code before it.

tests/data/golden_methods.json holds the per-layer dev accuracies (final and per epoch), the
sweep points of four signals and the true-early-exit checks of every built-in method, recorded
with ``python -m tests.golden`` on main at 3562c3b (before the plugin contract; first recorded on
62dc638, re-recorded after main changed the CPU attention kernel and numbers). The same run on
the current code must give exactly the same numbers on the CPU.
"""

import json
from pathlib import Path

import pytest

from tests.golden import produce


@pytest.mark.slow
def test_ported_methods_reproduce_the_old_numbers_exactly(tmp_path):
    want = json.loads((Path(__file__).parent / "data" / "golden_methods.json").read_text())
    got = json.loads(json.dumps(produce(tmp_path)))  # same float -> JSON round trip as the file
    assert sorted(got) == sorted(want)
    for method in want:
        for key in ("logits_sha256", "layers", "history", "steps", "sweeps", "confirm"):
            assert got[method][key] == want[method][key], f"{method}: {key} differs from the old code"
