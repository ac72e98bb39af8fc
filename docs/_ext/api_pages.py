"""The API reference's module pages, written before Sphinx reads the sources.

Each public module gets ``api/generated/<module>.rst``: the module's docstring, a table
of the names ``pyro_vae`` re-exports (documented once, at the top level), and the
module's other public classes and functions, each on a page of its own (autosummary).
"""

import importlib
import inspect
from pathlib import Path

import pyro_vae

#: The modules of the reference, in the order of its table of contents.
MODULES = ("contract", "train", "objectives", "evaluation", "datasets", "priors",
           "likelihoods", "guides", "nn", "semisupervised", "checkpoints", "config", "runs",
           "compiled", "fused", "plots")


def public_names(module) -> list:
    """Classes and functions defined in ``module`` whose names do not start with ``_``."""
    return [name for name, obj in vars(module).items()
            if not name.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
            and obj.__module__ == module.__name__]


def toplevel_names() -> set:
    """``module.name`` of every class and function in ``pyro_vae.__all__``."""
    names = set()
    for name in pyro_vae.__all__:
        obj = getattr(pyro_vae, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            names.add(f"{obj.__module__}.{obj.__name__}")
    return names


def module_page(modname: str, toplevel: set) -> str:
    module = importlib.import_module(modname)
    names = public_names(module)
    shared = [n for n in names if f"{modname}.{n}" in toplevel]
    own = [n for n in names if f"{modname}.{n}" not in toplevel]
    title = modname.replace("_", r"\_")
    lines = [title, "=" * len(title), "", f".. automodule:: {modname}", "   :no-members:", ""]
    if shared:
        lines += ["Also at the top level", "---------------------", "",
                  ".. autosummary::", "   :nosignatures:", ""]
        lines += [f"   pyro_vae.{n}" for n in shared] + [""]
    if own:
        lines += ["In this module", "--------------", "",
                  ".. autosummary::", "   :toctree:", "   :nosignatures:", ""]
        lines += [f"   {n}" for n in own] + [""]
    return "\n".join(lines)


def write(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    toplevel = toplevel_names()
    for name in MODULES:
        modname = f"pyro_vae.{name}"
        page = folder / f"{modname}.rst"
        text = module_page(modname, toplevel)
        if not page.exists() or page.read_text() != text:  # unchanged: not rebuilt
            page.write_text(text)
