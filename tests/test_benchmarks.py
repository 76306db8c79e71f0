"""The benchmark scripts' own logic (their figures need the real runs; see README.md)."""
import importlib.util
from pathlib import Path

import pytest


def _load(name):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_seeds_variants_and_paired_summary():
    rs = _load("recipe_seeds")
    assert rs.parse_variant("base") == ("base", {})
    assert rs.parse_variant("x:lr=0.2,epochs=9,tta=flip") == ("x", {"lr": 0.2, "epochs": 9, "tta": "flip"})
    with pytest.raises(SystemExit, match="key=value"):
        rs.parse_variant("x:lr")
    rows = [{"variant": "a", "seed": s, "top1": 0.9, "tta": t} for s, t in [(0, 0.905), (1, 0.907), (2, 0.91)]]
    rows += [{"variant": "b", "seed": s, "top1": 0.9, "tta": t} for s, t in [(0, 0.906), (1, 0.906), (2, 0.912)]]
    a, b = rs.summarise(rows, ["a", "b"], bar=90.66)
    assert a["n"] == 3 and a["tta"]["mean"] == pytest.approx(90.733, abs=1e-3) and "paired" not in a
    assert a["at_or_above_bar"] == 2 and b["at_or_above_bar"] == 1  # 90.5, 90.7, 91.0 vs 90.6, 90.6, 91.2
    assert b["paired"] == {"mean": pytest.approx(0.067, abs=1e-3), "n": 3, "better": 2, "worse": 1}


def test_recipe_seeds_moves_the_yardstick_source():
    rs = _load("recipe_seeds")
    if not rs.YARDSTICK.is_file():
        pytest.skip("the shared yardstick is not beside this checkout")
    src = rs.YARDSTICK.read_text()
    assert all(old in src for old, _ in rs._MOVE)  # else --yardstick would stop with a clear message
