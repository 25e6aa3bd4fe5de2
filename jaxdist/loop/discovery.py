"""Find experiments: the modules of the `experiments` package, or a `.py` file by path."""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from jaxdist.base.errors import UserError

if TYPE_CHECKING:
    from jaxdist.base.config import Config
    from jaxdist.step.experiment import Experiment

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
    if is_file_reference(name):
        module = _load_file(Path(name))
    else:
        known = list_experiments()
        if name not in known:
            available = ", ".join(known) or "none found"
            raise UserError(f"unknown experiment {name!r}; available: {available} "
                            f"(python -m jaxdist.run --list)")
        module = _import_reporting_errors(lambda: importlib.import_module(f"{PACKAGE}.{name}"),
                                          folder_file(name))
    for attr in ("config", "build"):
        if not callable(getattr(module, attr, None)):
            raise UserError(f"experiment {name!r} does not define {attr}(); an experiment "
                            f"module needs config() and build(config)")
    return module


def load(experiment: str, overrides: Sequence[str] = ()) -> tuple[Experiment, Config]:
    """Build `experiment` (a name from `--list` or a `.py` path) with `KEY=VALUE` overrides.

    Returns (experiment, config): what `python -m jaxdist.run` trains, for Python.
    """
    from jaxdist.base.config import apply_overrides

    module = load_experiment(experiment)
    config = apply_overrides(module.config(), list(overrides))
    return name_experiment(module.build(config), experiment), config


def name_experiment(built: Experiment, experiment: str) -> Experiment:
    """`built`, named after `experiment` (for checkpoints) and able to be loaded again."""
    if not built.name:
        built.name = Path(experiment).stem
    if not built.source:
        built.source = (str(Path(experiment).resolve()) if is_file_reference(experiment)
                        else experiment)
    return built


def is_file_reference(experiment: str) -> bool:
    """Whether `experiment` names a `.py` file (to run it is to run its code) or a bundled one."""
    return experiment.endswith(".py")


def file_digest(experiment: str) -> str | None:
    """The sha256 of the experiment file `experiment`, or None for a bundled name."""
    if not is_file_reference(experiment):
        return None
    return hashlib.sha256(Path(experiment).read_bytes()).hexdigest()


def _load_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise UserError(f"experiment file {path} does not exist; give a path to a .py file "
                        f"or a name from python -m jaxdist.run --list")
    name = f"jaxdist_experiment_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it is executed
    _import_reporting_errors(lambda: spec.loader.exec_module(module), path)
    return module


def folder_file(name: str) -> Path:
    """The file of the bundled experiment `name`."""
    folder = experiments_dir()
    return (folder / f"{name}.py") if folder is not None else Path(f"{name}.py")


def _import_reporting_errors(load: Callable[[], object], path: Path) -> object:
    """Run `load`; an experiment file that fails to import becomes one line naming where."""
    try:
        return load()
    except SyntaxError as error:
        raise UserError(f"experiment file {error.filename}, line {error.lineno}: "
                        f"{error.msg}") from None
    except (ImportError, NameError, AttributeError, TypeError, ValueError) as error:
        package = sys.modules.get("jaxdist")
        if isinstance(error, ImportError) and getattr(package, "__file__", "") is None:
            raise UserError(f"the folder {list(package.__path__)[0]} (named jaxdist, not the "
                            f"package) hides the installed jaxdist; run from another folder, "
                            f"or install with pip install -e . --config-settings "
                            f"editable_mode=compat") from None
        where = _innermost_line(error, path)
        raise UserError(f"experiment file {path}{where} failed to import: "
                        f"{type(error).__name__}: {error}") from None


def _innermost_line(error: BaseException, path: Path) -> str:
    """", line N" of the last traceback frame inside `path`, or "" if none is."""
    line = ""
    for frame, lineno in traceback.walk_tb(error.__traceback__):
        if Path(frame.f_code.co_filename).resolve() == path.resolve():
            line = f", line {lineno}"
    return line
