"""Layers depend downward only (docs/architecture.md draws this map).

accounting/utils -> privacy -> mechanism -> optimizers/training/data -> audit
-> nlp -> export -> recipe -> tfx -> trainers. A module may import its own
layer or any layer below it, never above: that keeps the privacy-critical core
free of model, data and serving code, and the accountant, the privacy plan and
report, and the configs that TFX pipelines parse free of TensorFlow.
"""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Package -> layer rank. Equal ranks may import each other.
LAYERS = {
    "ewtune_tf.accounting": 0,
    "ewtune_tf.utils": 0,
    "ewtune_tf.privacy": 1,
    "ewtune_tf.mechanism": 2,
    "ewtune_tf.optimizers": 3,
    "ewtune_tf.training": 3,
    "ewtune_tf.data": 3,
    "ewtune_tf.audit": 4,
    "ewtune_tf.nlp": 5,
    "ewtune_tf.export": 6,
    "ewtune_tf.recipe": 7,
    "ewtune_tf.tfx": 8,
    "trainers": 9,
}
# Modules that must not import TensorFlow directly (tests/privacy/
# test_import_hygiene.py checks that they do not pull it in either).
NO_TENSORFLOW = (
    "ewtune_tf.accounting",
    "ewtune_tf.utils",
    "ewtune_tf.privacy",
    "ewtune_tf.recipe.config",
    "ewtune_tf.tfx.config",
    "ewtune_tf.tfx.gate",
)
TF_MODULES = ("tensorflow", "keras", "keras_hub", "keras_nlp", "tensorflow_privacy", "tfx")


def _layer_of(module: str):
    for package, rank in LAYERS.items():
        if module == package or module.startswith(package + "."):
            return package, rank
    return None, None


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            for alias in node.names:  # `from ewtune_tf import nlp`
                yield f"{node.module}.{alias.name}"


def _source_files():
    for tree in ("ewtune_tf", "trainers"):
        for path in sorted((ROOT / tree).rglob("*.py")):
            if "__pycache__" not in path.parts:
                yield path


def test_layers_depend_downward_only():
    violations = []
    for path in _source_files():
        module = _module_name(path)
        package, rank = _layer_of(module)
        if package is None:
            continue  # ewtune_tf/__init__.py and version.py: lazy, layer-free
        for imported in _imports(path):
            imported_package, imported_rank = _layer_of(imported)
            if imported_rank is not None and imported_rank > rank:
                violations.append(f"{module} imports {imported} ({imported_package} is above {package})")
    assert not violations, "\n".join(violations)


def test_accounting_imports_no_tensorflow():
    offenders = []
    for path in _source_files():
        module = _module_name(path)
        if not module.startswith(NO_TENSORFLOW):
            continue
        for imported in _imports(path):
            if imported.split(".")[0] in TF_MODULES:
                offenders.append(f"{module} imports {imported}")
    assert not offenders, "\n".join(offenders)


def test_tensorflow_privacy_is_imported_in_one_place_only():
    shim = ROOT / "ewtune_tf" / "mechanism" / "tf_privacy.py"
    offenders = [
        str(path.relative_to(ROOT))
        for path in _source_files()
        if path != shim and any(i.split(".")[0] == "tensorflow_privacy" for i in _imports(path))
    ]
    assert not offenders, "import TF Privacy through ewtune_tf.mechanism.tf_privacy: " + ", ".join(offenders)


def test_package_docstrings_state_their_layer():
    """Each package's docstring names its layer, and names it right."""
    wrong = []
    for package, rank in LAYERS.items():
        init = ROOT.joinpath(*package.split("."), "__init__.py")
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        stated = {int(n) for n in re.findall(r"\b[Ll]ayer (\d+)", doc)}
        if stated != {rank}:
            wrong.append(f"{package}: docstring states layer(s) {sorted(stated)}, tests/test_layering.py says {rank}")
    assert not wrong, "\n".join(wrong)


def test_docs_architecture_shows_this_layer_map():
    text = (ROOT / "docs" / "architecture.md").read_text()
    documented = {pkg: int(rank) for rank, pkg in re.findall(r"^\| (\d+) \| `([a-z_.]+)` \|", text, flags=re.M)}
    assert documented == LAYERS
