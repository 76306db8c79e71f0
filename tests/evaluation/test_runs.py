"""compare.py: `imgclf runs` and `imgclf compare` read their figures from run folders."""
import json
import shutil

from PIL import Image

import imgclf
from imgclf.evaluation.plots import PLOT_SIZES

from support import run_cli as _cli


def test_runs_and_compare(tiny_run, tmp_path, capsys):
    project = tmp_path / "runs"
    shutil.copytree(tiny_run.run_dir, project / "a")
    shutil.copytree(tiny_run.run_dir, project / "b")
    (project / "not-a-run").mkdir()
    rows = imgclf.runs(project)
    assert sorted(r["name"] for r in rows) == ["a", "b"]
    a = rows[0]
    saved = json.loads((tiny_run.run_dir / "evaluation.json").read_text())
    assert a["model"] == "seed-cnn" and a["params"] > 1000 and a["epochs"] == 3
    assert a["test_top1"] == saved["top1"] and a["macro_f1"] == saved["macro_f1"]
    code, out, _ = _cli(capsys, "runs", str(project))
    assert code == 0 and "seed-cnn" in out and "macro F1" in out and out.count("\n") >= 3

    code, out, err = _cli(capsys, "compare", str(project / "a"), str(project / "b"), "--out", str(tmp_path / "cmp"))
    assert code == 0, err
    assert "written:" in out
    with Image.open(tmp_path / "cmp" / "compare.png") as img:
        assert img.size == PLOT_SIZES["compare.png"]
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert "data:image/png;base64," in page and "<td>a</td>" in page and "<td>b</td>" in page
    code, out, _ = _cli(capsys, "compare", str(project / "a"), "--json", "--out", str(tmp_path / "cmp"))
    assert json.loads(out)[0]["name"] == "a"
    code, _, err = _cli(capsys, "compare", str(project / "not-a-run"))
    assert code == 2 and "not a run folder" in err
    code, _, err = _cli(capsys, "runs", str(tmp_path / "missing"))
    assert code == 2 and "no such folder" in err
