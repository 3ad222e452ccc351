"""The layers import downwards only: the core package ``lit_dimba`` never imports the application around it (the
data sources, the callbacks, the entry points), so it can be used and tested without them."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
ABOVE_THE_CORE = {"datamodules", "callbacks", "benchmarks", "main", "tests"}


def imported_modules(path: pathlib.Path) -> set[str]:
    """Absolute module names imported anywhere in a file (also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def test_the_core_does_not_import_the_layers_above_it():
    files = sorted((ROOT / "lit_dimba").rglob("*.py"))
    imports = {path.relative_to(ROOT).as_posix(): imported_modules(path) for path in files}
    assert "lit_dimba.scenes" in imports["lit_dimba/eval/prompt_following.py"]  # the scan sees imports
    upward = {path: sorted(name for name in names if name.split(".")[0] in ABOVE_THE_CORE)
              for path, names in imports.items()}
    assert not {path: names for path, names in upward.items() if names}
