"""How the docs build runs the tutorials (sphinx-gallery): their options, their figures.

The tutorials are plain scripts that write their figures to ``--out``. The build passes
each its options (``reset_argv``) and shows every PNG a code cell wrote (``PNGScraper``),
so a tutorial needs no change to run under sphinx-gallery.

``PYRO_VAE_DOCS_TUTORIALS`` chooses how they run:

- ``full`` (default; ``off`` on Read the Docs, which has no data): on the real data sets, with the options of ``FULL`` below (the
  scripts' own defaults where they are not given);
- ``smoke``: ``--smoke``, a tiny run of seconds (for CI): the numbers mean nothing;
- ``off``: not run; the pages show the code and prose without output.

The data come from ``$PYRO_VAE_DATA`` (MNIST; Frey Faces for tutorial 12).
"""

import logging
import os
import shutil
import sys
from pathlib import Path

MODES = ("full", "smoke", "off")

#: Options of each tutorial in a full build, beyond its defaults (none yet: every
#: tutorial runs as ``python tutorials/NN_name.py`` would).
FULL = {}


def mode() -> str:
    default = "off" if os.environ.get("READTHEDOCS") else "full"
    value = os.environ.get("PYRO_VAE_DOCS_TUTORIALS", default)
    if value not in MODES:
        raise ValueError(f"PYRO_VAE_DOCS_TUTORIALS={value!r}: expected one of {MODES}")
    return value


def output_root() -> Path:
    """Where the tutorials' --out folders go: beside the HTML, in the build folder."""
    return Path(os.environ.get("PYRO_VAE_DOCS_RUNS",
                               Path(__file__).resolve().parents[1] / "_build" / "runs"))


def out_dir(src_file) -> Path:
    return output_root() / Path(src_file).stem


def reset_argv(gallery_conf, script_vars) -> list:
    """The command-line options a tutorial runs with in the docs build."""
    name = Path(script_vars["src_file"]).name
    out = out_dir(script_vars["src_file"])
    shutil.rmtree(out, ignore_errors=True)  # figures of an earlier build are not shown
    args = ["--out", str(out)]
    if name.startswith("05_"):  # the surgery of tutorial 4's models, not of new ones
        args += ["--models", str(output_root() / "04_vampprior")]
    if mode() == "smoke":
        args += ["--smoke", "--device", "cpu"]
    else:
        args += FULL.get(name, [])
    _log_to_page()
    return args


class _PageStream(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stdout`` is when a record comes, which
    under sphinx-gallery is the page's captured output."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def _log_to_page() -> None:
    """The package's log lines (a Monte Carlo KL, a compiled step, early stopping) go to
    the page's output, as they go to the terminal when the script runs by itself."""
    logger = logging.getLogger("pyro_vae")
    if not any(isinstance(h, _PageStream) for h in logger.handlers):
        handler = _PageStream()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO)


class PNGScraper:
    """The PNG files a code cell wrote to the tutorial's ``--out`` folder, shown below
    the cell in the order they were written."""

    def __init__(self):
        self.seen = {}

    def __repr__(self):  # a stable repr: sphinx-gallery's cache compares configurations
        return "PNGScraper"

    def __call__(self, block, block_vars, gallery_conf):
        from sphinx_gallery.scrapers import figure_rst

        out = out_dir(block_vars["src_file"])
        if not out.is_dir():
            return ""
        new = []
        for png in out.rglob("*.png"):
            stamp = png.stat().st_mtime_ns
            if self.seen.get(png) != stamp:
                self.seen[png] = stamp
                new.append((stamp, png))
        images = []
        for _, png in sorted(new):
            target = next(block_vars["image_path_iterator"])
            shutil.copyfile(png, target)
            images.append(target)
        return figure_rst(images, gallery_conf["src_dir"])


png_scraper = PNGScraper()
