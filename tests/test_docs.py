"""The documentation: every Python block of its pages runs as printed, every public name
has its entry in the API reference, and the examples in the docstrings pass as doctests.
(CI builds the site itself with warnings as errors: see .ci/run.)"""

import doctest
import importlib
import inspect
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

import pyro_vae

DOCS = REPO / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md")
               if not {"_build", "tutorials", "_inventories"} & set(p.relative_to(DOCS).parts))
CONTINUED = "# (continued from the block above)"


def _blocks(page):
    """A page's Python blocks as they run: a block whose first line is ``CONTINUED``
    runs after the block before it, in one process (as a reader would go on)."""
    blocks = []
    for block in re.findall(r"^```python\n(.*?)^```", page.read_text(), re.M | re.S):
        if block.startswith(CONTINUED) and blocks:
            block = blocks[-1] + block
        blocks.append(block)
    return blocks


BLOCKS = [(page, i, block) for page in PAGES for i, block in enumerate(_blocks(page))]


def test_the_pages_have_python_blocks():
    assert len(PAGES) >= 15
    assert len(BLOCKS) >= 4


@pytest.mark.slow
@pytest.mark.parametrize("page, index, block", BLOCKS,
                         ids=[f"{p.relative_to(DOCS)}-{i + 1}" for p, i, _ in BLOCKS])
def test_docs_python_block_runs_as_printed(page, index, block, tmp_path, data_root):
    env = dict(os.environ, PYRO_VAE_DATA=str(data_root.resolve()), MPLBACKEND="Agg")
    r = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    where = f"{page.relative_to(REPO)}, block {index + 1}"
    assert r.returncode == 0, f"{where}:\n{block}\n{r.stderr[-3000:]}"
    assert list(tmp_path.iterdir()) == [], f"{where} wrote into the working folder"


def api_entries() -> set:
    """The names the API reference documents at the top level (autosummary lines and
    ``py:data`` directives of docs/api/index.rst) and the modules it has pages for."""
    text = (DOCS / "api" / "index.rst").read_text()
    names = set()
    for block in text.split(".. autosummary::")[1:]:
        entries = re.match(r"(?:\n   :.*)*\n\n((?:   \S+\n)+)", block)
        names |= set(entries.group(1).split())
    names |= set(re.findall(r"^\.\. py:data:: (\w+)$", text, re.M))
    modules = re.findall(r"^   generated/pyro_vae\.(\w+)$",
                         (DOCS / "api" / "modules.rst").read_text(), re.M)
    return names, modules


def test_every_public_name_has_an_api_entry():
    names, modules = api_entries()
    public = set(pyro_vae.__all__)
    submodules = {n for n in public if inspect.ismodule(getattr(pyro_vae, n))}
    assert sorted(public - submodules - names) == []
    assert sorted(names - public) == []  # nothing listed that is not public
    assert sorted(submodules - set(modules)) == []
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        api_pages = importlib.import_module("api_pages")
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    assert list(api_pages.MODULES) == modules  # the pages written are the pages listed


MODULES = sorted(f"pyro_vae.{p.stem}" for p in (REPO / "pyro_vae").glob("*.py")
                 if p.stem not in ("__init__", "__main__"))


def test_docstring_examples_pass_as_doctests():
    attempted = 0
    for name in MODULES:
        result = doctest.testmod(importlib.import_module(name), verbose=False,
                                 optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0, f"{name}: {result.failed} doctest example(s) failed"
        attempted += result.attempted
    assert attempted >= 5  # the docstrings do have examples
