"""The house rules, read from the source: arrows point one way (train.py, predict.py, serve.py -> web/, app/,
datasets/ and models/ -> core/), Keras stays out of core/, models/, app/, datasets/ and web/ (it is only the
oracle in tests and benchmarks), and the names a flag may take are read without TensorFlow."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imported_modules(path):
    """Top-level names of every module `path` imports, plus 'tf.keras' if it touches tf.keras / tensorflow.keras."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Attribute) and node.attr == "keras":
            names.add("tf.keras")
    return names


def sources(folder):
    """The folder's Python files, its packages' (core/optimizers/) included."""
    return sorted((REPO / folder).rglob("*.py"))


def source_id(path):
    return str(path.relative_to(REPO))


@pytest.mark.parametrize("path", sources("core") + sources("models") + sources("app") + sources("datasets")
                         + sources("web"), ids=source_id)
def test_no_keras_in_the_framework_or_the_models(path):
    keras = {name for name in imported_modules(path)
             if name == "tf.keras" or name.split(".")[0] == "keras" or name.startswith("tensorflow.keras")}
    assert not keras, f"{path.relative_to(REPO)} uses {sorted(keras)}"


@pytest.mark.parametrize("path", sources("core"), ids=source_id)
def test_core_imports_nothing_above_it(path):
    """The framework knows no application: not its data sets (datasets/), pictures or export (app/), models."""
    above = {name for name in imported_modules(path)
             if name.split(".")[0] in ("app", "datasets", "models", "web", "train", "predict", "serve")}
    assert not above, f"{path.relative_to(REPO)} imports {sorted(above)}"


@pytest.mark.parametrize("path", sources("datasets"), ids=source_id)
def test_datasets_import_only_core(path):
    above = {name for name in imported_modules(path)
             if name.split(".")[0] in ("app", "models", "web", "train", "predict", "serve")}
    assert not above, f"{path.relative_to(REPO)} imports {sorted(above)}"


@pytest.mark.parametrize("path", sources("models") + sources("app") + sources("web"), ids=source_id)
def test_models_import_no_entry_point(path):
    """Nor lab/, which sits beside the entry points: notebooks and scripts call the application."""
    above = {name for name in imported_modules(path) if name.split(".")[0] in ("train", "predict", "serve", "lab")}
    assert not above, f"{path.relative_to(REPO)} imports {sorted(above)}"


# What train.py reads before TensorFlow loads: the flags, the settings and every registry of names.
WITHOUT_TENSORFLOW = ["train.py", "app/__init__.py", "app/settings.py", "app/console.py", "app/rundirs.py",
                      "app/run.py", "core/cli.py", "core/config.py", "core/names.py", "core/interrupts.py",
                      "core/native_logs.py", "core/rundir.py", "models/__init__.py", "datasets/__init__.py",
                      "datasets/checksums.py", "datasets/download.py", "datasets/idx.py"]


def top_level_imports(path):
    """The modules `path` imports when it is imported (not those imported inside its functions)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.update([node.module] if node.module != "core" and node.module != "app" else
                         [f"{node.module}.{alias.name}" for alias in node.names])
    return names


@pytest.mark.parametrize("name", WITHOUT_TENSORFLOW)
def test_the_flags_and_the_registries_import_no_tensorflow(name):
    """Each of these imports only the others, the standard library, absl and numpy, so that a bad flag is
    answered before TensorFlow's 10 s start."""
    ours = {path[:-3].replace("/", ".").replace(".__init__", "") for path in WITHOUT_TENSORFLOW}
    local = {"app", "core", "models", "datasets", "web", "lab", "tensorflow", "keras"}
    loaded = {module for module in top_level_imports(REPO / name) if module.split(".")[0] in local}
    assert loaded <= ours, f"{name} imports {sorted(loaded - ours)}"


def test_the_rule_reader_sees_keras_and_upward_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import keras\nfrom models import REGISTRY\nimport tensorflow as tf\nx = tf.keras.layers\n"
                   "from datasets import idx\n")
    assert {"keras", "models", "tf.keras", "datasets"} <= imported_modules(bad)
