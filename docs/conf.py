"""Sphinx configuration of the pyro_vae documentation.

Build (from the repository root; offline, warnings as errors):

    PYRO_VAE_DATA=path/to/data sphinx-build -W --keep-going -n docs docs/_build/html

``PYRO_VAE_DOCS_TUTORIALS`` = ``full`` (default), ``smoke`` or ``off`` chooses how the
tutorials run (``docs/_ext/tutorial_gallery.py``).
"""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE.parent))

import api_pages  # noqa: E402
import inventories  # noqa: E402
import tutorial_gallery  # noqa: E402

import pyro_vae  # noqa: E402

project = "pyro_vae"
author = "the pyro_vae authors"
copyright = "the pyro_vae authors"
release = version = pyro_vae.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_inventories", "_ext", "_templates",
                    "tutorials/*.ipynb", "tutorials/*.py.md5", "tutorials/*.zip"]
templates_path = ["_templates"]

# Every cross-reference must resolve: -n turns each dangling one into a warning, and
# -W --keep-going into a failed build that lists all of them.
nitpicky = True
nitpick_ignore = [
    # typing's names that Python's inventory does not list as classes
    ("py:class", "Ellipsis"),
]

# --- API reference (docstrings in reST; Google-style sections through napoleon).
autosummary_generate = True
autosummary_imported_members = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_default_options = {"show-inheritance": True}
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = False  # nn.Module.forward's text is not ours to show
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
add_module_names = False
python_use_unqualified_type_names = True
api_pages.write(HERE / "api" / "generated")



def public_bases(app, name, obj, options, bases):
    """A private base class (``_LatentModel``) is shown as its own public bases."""
    if bases == [object]:  # nothing to say
        bases.clear()
    i = 0
    while i < len(bases):
        if bases[i].__name__.startswith("_"):
            bases[i:i + 1] = [b for b in bases[i].__bases__ if b not in bases]
        else:
            i += 1


def dataclass_fields(app, what, name, obj, options, lines):
    """A dataclass whose fields carry ``help`` metadata (``TrainConfig``: the command
    line's help texts) lists its fields with their defaults and help, grouped."""
    import dataclasses

    if what != "class" or not dataclasses.is_dataclass(obj):
        return
    fields = [f for f in dataclasses.fields(obj) if "help" in f.metadata]
    if not fields:
        return
    for group in dict.fromkeys(f.metadata.get("group", "") for f in fields):
        lines += ["", f".. rubric:: {group.capitalize() or 'Fields'} settings", ""]
        for f in fields:
            if f.metadata.get("group", "") != group:
                continue
            default = (f.default if f.default is not dataclasses.MISSING
                       else f.default_factory())
            help_text = " ".join(f.metadata["help"].split()).replace("*", r"\*")
            lines += [f"- ``{f.name}`` (default ``{default!r}``): {help_text}"]
    lines.append("")


def setup(app):
    app.connect("autodoc-process-bases", public_bases)
    app.connect("autodoc-process-docstring", dataclass_fields)
    app.connect("source-read", tutorial_gallery.add_note)
    app.connect("builder-inited", tutorial_gallery.rerun_stale, priority=400)


# --- Links into Python's, PyTorch's, Pyro's and NumPy's documentation. The inventories
# are stored in docs/_inventories (the build never goes online); docs/_inventories/README.md
# says where each comes from and how to refresh it.
intersphinx_mapping = {
    name: (url, inventories.location(name, HERE / "_build"))
    for name, url in {
        "python": "https://docs.python.org/3",
        "torch": "https://docs.pytorch.org/docs/stable",
        "pyro": "https://docs.pyro.ai/en/stable",
        "numpy": "https://numpy.org/doc/stable",
    }.items()
}

# --- Pages in Markdown (MyST).
myst_enable_extensions = ["dollarmath", "deflist"]
myst_heading_anchors = 3

# --- Tutorials: tutorials/*.py rendered by sphinx-gallery, run as docs/_ext/tutorial_gallery.py
# says.
sphinx_gallery_conf = {
    "examples_dirs": ["../tutorials"],
    "gallery_dirs": ["tutorials"],
    "filename_pattern": r"/\d\d_",
    "ignore_pattern": r"_common\.py",
    "within_subsection_order": "FileNameSortKey",
    "plot_gallery": tutorial_gallery.mode() != "off",
    "reset_argv": "tutorial_gallery.reset_argv",
    "image_scrapers": ("tutorial_gallery.png_scraper",),
    "reset_modules": (),
    "download_all_examples": False,
    "remove_config_comments": True,
    "show_memory": False,
    "line_numbers": False,
    "capture_repr": (),
    "abort_on_example_error": True,
    "matplotlib_animations": False,
    "first_notebook_cell": None,
    "min_reported_time": 0,
}

# --- HTML.
html_theme = "furo"
html_title = f"pyro_vae {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
    "source_repository": "",
    "navigation_with_keys": True,
}
smartquotes = False  # "--out" stays two hyphens, as typed on the command line
highlight_language = "none"  # literal blocks (formulas, commands) are not Python
pygments_style = "sphinx"
pygments_dark_style = "monokai"
