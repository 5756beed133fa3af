"""The Bazel BUILD files must not rot: every Python file has a target.

Bazel itself is not installed in CI, so this reads the BUILD files as text and
checks the two ways they go stale: a new module or test that nobody listed,
and a listed file that no longer exists.
"""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
COVERED_TREES = ("ewtune_tf", "trainers", "tests", "benchmarks")
_RULE = re.compile(r"\b(py_library|py_test|py_binary)\s*\(", re.M)


def _build_files():
    for path in sorted(ROOT.rglob("BUILD")):
        if any(part.startswith(".") for part in path.relative_to(ROOT).parts):
            continue  # .venv and friends
        yield path


def _rules(build_file: pathlib.Path):
    """Yields (rule kind, keyword dict) for each py_* rule in a BUILD file.

    BUILD files are Starlark, a Python subset, so `ast` parses them.
    """
    tree = ast.parse(build_file.read_text(), filename=str(build_file))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in ("py_library", "py_test", "py_binary"):
                # Only srcs/deps matter here; other attributes (data = glob(...))
                # may be non-literal Starlark.
                kwargs = {
                    kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg in ("name", "srcs", "deps")
                }
                yield node.func.id, kwargs


def _listed_sources():
    listed = {}
    for build_file in _build_files():
        for kind, kwargs in _rules(build_file):
            for src in kwargs.get("srcs", []):
                listed[(build_file.parent / src).resolve()] = (build_file, kind)
    return listed


def test_every_python_file_has_a_build_target():
    listed = _listed_sources()
    missing = []
    for tree in COVERED_TREES:
        for path in sorted((ROOT / tree).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            if path.resolve() not in listed:
                missing.append(str(path.relative_to(ROOT)))
    assert not missing, "Python files without a BUILD target: " + ", ".join(missing)


def test_every_listed_source_exists():
    stale = [
        f"{build.relative_to(ROOT)}: {src.relative_to(ROOT)}"
        for src, (build, _) in _listed_sources().items()
        if not src.exists()
    ]
    assert not stale, "BUILD files list missing files: " + ", ".join(stale)


def test_tests_are_py_test_targets():
    wrong = [
        str(src.relative_to(ROOT))
        for src, (_, kind) in _listed_sources().items()
        if src.name.startswith("test_") and kind != "py_test"
    ]
    assert not wrong, "test files must be py_test srcs: " + ", ".join(wrong)


def test_deps_point_at_existing_packages():
    dangling = []
    for build_file in _build_files():
        for _, kwargs in _rules(build_file):
            for dep in kwargs.get("deps", []):
                if dep.startswith("//"):
                    package = dep[2:].split(":")[0]
                    if not (ROOT / package / "BUILD").exists():
                        dangling.append(f"{build_file.relative_to(ROOT)} -> {dep}")
    assert not dangling, "deps on packages without a BUILD file: " + ", ".join(dangling)
