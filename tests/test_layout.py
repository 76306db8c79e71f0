"""The package's shape: imports run one way (data and models at the bottom, the command line at the top),
with no cycle, function-level imports included, and no public name shadows a module."""
import ast
from pathlib import Path

import imgclf

SRC = Path(imgclf.__file__).parent


def _module(path: Path) -> str:
    parts = ["imgclf", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the imgclf modules it imports anywhere in its text (top level or inside functions)."""
    files = {_module(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in files else target for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[mod].update(t for t in targets if t in files and t != mod)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_layers_import_downwards_only():
    """data and models import nothing above them; inference and the classifiers nothing of training,
    evaluation, deploy or the command line, and the heat maps (explain) sit between the two; training,
    evaluation and deploy never the command line."""
    graph = import_graph()
    above = {
        "imgclf.data": ("imgclf.inference", "imgclf.explain", "imgclf.classifier", "imgclf.onnx_runtime",
                        "imgclf.tflite_runtime", "imgclf.training", "imgclf.evaluation", "imgclf.deploy", "imgclf.cli",
                        "imgclf.models"),
        "imgclf.models": ("imgclf.inference", "imgclf.explain", "imgclf.classifier", "imgclf.onnx_runtime",
                          "imgclf.tflite_runtime", "imgclf.training", "imgclf.evaluation", "imgclf.deploy",
                          "imgclf.cli", "imgclf.data"),
        "imgclf.inference": ("imgclf.explain", "imgclf.classifier", "imgclf.training", "imgclf.evaluation",
                             "imgclf.deploy", "imgclf.cli"),
        "imgclf.explain": ("imgclf.classifier", "imgclf.onnx_runtime", "imgclf.tflite_runtime", "imgclf.training",
                           "imgclf.evaluation", "imgclf.deploy", "imgclf.cli"),
        "imgclf.classifier": ("imgclf.training", "imgclf.evaluation", "imgclf.deploy", "imgclf.cli"),
        "imgclf.evaluation": ("imgclf.training", "imgclf.deploy", "imgclf.cli"),
        "imgclf.deploy": ("imgclf.training", "imgclf.cli"),
        "imgclf.training": ("imgclf.deploy", "imgclf.cli"),
    }
    wrong = [(m, t) for m, targets in graph.items() for t in targets for layer, banned in above.items()
             if (m == layer or m.startswith(layer + ".")) and (t in banned or t.startswith(banned))
             or t == "imgclf" and m != "imgclf"]
    assert wrong == []


def test_public_names_do_not_shadow_modules():
    """`imgclf.export` is the function, and no module named imgclf.export exists to be hidden by it."""
    modules = {p.stem for p in SRC.iterdir() if p.suffix == ".py"} | {p.name for p in SRC.iterdir() if p.is_dir()}
    assert not set(imgclf.__all__) & modules


def test_the_package_and_the_command_start_without_torch():
    """`import imgclf` and the command's own module load no torch (names resolve on first use), so `imgclf --help`
    answers at once and `predict --source` decodes while torch loads; every public name still resolves."""
    import subprocess
    import sys

    code = ("import sys, imgclf, imgclf.cli, imgclf.data.video, imgclf.data.video_process\n"
            "assert 'torch' not in sys.modules, 'torch imported at start'\n"
            "missing = [n for n in imgclf.__all__ if getattr(imgclf, n, None) is None]\n"
            "assert not missing, missing\n"
            "import imgclf.data as d\n"
            "assert all(getattr(d, n, None) is not None for n in d.__all__)\n"
            "assert sorted(dir(imgclf)) == sorted(imgclf.__all__)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
