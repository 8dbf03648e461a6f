"""The package imports only downward, and never another module's private names.

A module may import from its own layer or a lower one (function-local imports included): the
model never reaches for the trainer, the data pipeline never for the CLI. See the file layout
in docs/CONTRACTS.md for what each layer holds.
"""

import ast
from pathlib import Path

import babyllama

PACKAGE = Path(babyllama.__file__).parent
LAYERS = [  # lowest first
    {"errors", "atomic", "textfile", "batching", "device"},
    {"model"}, {"lora"}, {"config"}, {"tokenizer"}, {"data"}, {"run"},
    {"infer"}, {"eval"}, {"train", "export"}, {"llm"}, {"serve"}, {"demo"}, {"cli", "__init__", "__main__"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def babyllama_imports(path: Path):
    """(line, imported module's top-level unit, imported names) for each babyllama import."""
    for node in ast.walk(ast.parse(path.read_bytes())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "babyllama":
            parts = node.module.split(".")
            yield node.lineno, parts[1] if len(parts) > 1 else "__init__", [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "babyllama":
                    yield node.lineno, parts[1] if len(parts) > 1 else "__init__", []


def test_every_module_imports_only_its_layer_or_below():
    upward, unplaced = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = path.relative_to(PACKAGE).with_suffix("").parts[0]
        if unit not in LAYER:
            unplaced.append(unit)
            continue
        for line, target, _ in babyllama_imports(path):
            if LAYER.get(target, len(LAYERS)) > LAYER[unit]:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} imports babyllama.{target}")
    assert not unplaced, f"modules in no layer (add them to LAYERS): {sorted(set(unplaced))}"
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_module_imports_private_names_of_another():
    private = [f"{path.relative_to(PACKAGE)}:{line} imports {name} from babyllama.{target}"
               for path in sorted(PACKAGE.rglob("*.py"))
               for line, target, names in babyllama_imports(path)
               for name in names if name.startswith("_") and not name.startswith("__")]
    assert not private, "\n".join(private)


def test_names_scripts_import_from_earlier_versions_stay_importable():
    """Moving code between modules must not break users' scripts (and ../shared/cases)."""
    from babyllama.cli import main, read_document  # noqa: F401
    from babyllama.config import load_config, save_config  # noqa: F401
    from babyllama.infer.chat import prompt_ids  # noqa: F401
    from babyllama.model.weights import load_weights as moved
    from babyllama.train.checkpoint import load_weights, save_weights  # noqa: F401

    assert load_weights is moved
