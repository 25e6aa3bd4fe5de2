"""Find experiments: the modules of the `experiments` package, or a `.py` file by path."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from jaxdist.errors import UserError

PACKAGE = "experiments"


def experiments_dir() -> Path | None:
    """The folder of the `experiments` package, or None if it cannot be found."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def list_experiments() -> dict[str, str]:
    """Map each experiment name to the first line of its docstring (read without importing)."""
    folder = experiments_dir()
    if folder is None:
        return {}
    found = {}
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        found[path.stem] = doc.strip().splitlines()[0] if doc.strip() else ""
    return found


def load_experiment(name: str) -> ModuleType:
    """Import the experiment `name` (or the file at that path) and check its interface."""
    if name.endswith(".py"):
        module = _load_file(Path(name))
    else:
        known = list_experiments()
        if name not in known:
            available = ", ".join(known) or "none found"
            raise UserError(f"unknown experiment {name!r}; available: {available} "
                            f"(python -m jaxdist.run --list)")
        module = importlib.import_module(f"{PACKAGE}.{name}")
    for attr in ("config", "build"):
        if not callable(getattr(module, attr, None)):
            raise UserError(f"experiment {name!r} does not define {attr}(); an experiment "
                            f"module needs config() and build(config)")
    return module


def _load_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise UserError(f"experiment file {path} does not exist; give a path to a .py file "
                        f"or a name from python -m jaxdist.run --list")
    name = f"jaxdist_experiment_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it is executed
    spec.loader.exec_module(module)
    return module
