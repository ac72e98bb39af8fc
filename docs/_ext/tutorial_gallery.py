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

import json
import logging
import os
import shutil
import sys
from pathlib import Path

MODES = ("full", "smoke", "off")
GALLERY = Path(__file__).resolve().parents[1] / "tutorials"  # sphinx-gallery's output

#: Options of each tutorial in a full build, beyond its defaults: shorter runs of the
#: same lessons, so that the whole site builds in under 80 minutes on a shared 2-core CPU.
#: Each page says which options built it (``note``).
FULL = {
    "03_beta_vae.py": ["--epochs", "3"],
    "04_vampprior.py": ["--epochs", "2", "--ll-points", "300", "--ll-samples", "300"],
    "05_elbo_surgery.py": ["--epochs", "2", "--points", "1000"],
    "06_custom_model.py": ["--epochs", "2"],
    "07_swapping_guides.py": ["--epochs", "2", "--guide-epochs", "1", "--ll-points", "300",
                              "--ll-samples", "300"],
    "08_hierarchical_vampprior.py": ["--epochs", "2", "--ll-points", "300",
                                     "--ll-samples", "300"],
    "09_scaling_up.py": ["--epochs", "2", "--limit", "5000"],
    "10_your_own_model.py": ["--epochs", "2", "--ll-points", "300", "--ll-samples", "200"],
    "11_semi_supervised.py": ["--epochs", "3", "--draws", "50"],
    "12_continuous_data.py": ["--epochs", "30", "--ll-samples", "300"],
}


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
    # Relative to the tutorial's folder (where sphinx-gallery runs it), as a user's own
    # run would print it.
    args = ["--out", os.path.relpath(out, Path(script_vars["src_file"]).parent)]
    if name.startswith("05_"):  # the surgery of tutorial 4's models, not of new ones
        args += ["--models", os.path.relpath(output_root() / "04_vampprior",
                                             Path(script_vars["src_file"]).parent)]
    args += wanted(name)
    GALLERY.mkdir(parents=True, exist_ok=True)
    _record(name).write_text(json.dumps(wanted(name)))
    _log_to_page()
    return args


def wanted(name: str) -> list:
    """The options (besides its folders) tutorial ``name`` runs with in this mode."""
    return ["--smoke", "--device", "cpu"] if mode() == "smoke" else FULL.get(name, [])


def _record(name: str) -> Path:
    """Where the options a tutorial's page was last built with are kept, beside its
    page in the gallery folder."""
    return GALLERY / (Path(name).stem + ".options.json")


def rerun_stale(app) -> None:
    """Before sphinx-gallery looks (``builder-inited``): a tutorial whose page was built
    with other options than this mode's (smoke output in a full build) runs again."""
    if mode() == "off":
        return
    for script in sorted(Path(app.srcdir, "..", "tutorials").glob("[0-9][0-9]_*.py")):
        record = _record(script.name)
        built = json.loads(record.read_text()) if record.exists() else None
        if built != wanted(script.name):
            (GALLERY / (script.name + ".md5")).unlink(missing_ok=True)


def note(name: str) -> str:
    """The note at the top of tutorial ``name``'s page: the options that built it."""
    record = _record(name)
    if mode() == "off" or not record.exists():
        return ("This page was built without running the script: its output and figures "
                "appear when the documentation is built with the data "
                "(see :doc:`/building-docs`).")
    built = json.loads(record.read_text())
    if "--smoke" in built:
        return ("This page was built with ``--smoke``, a run of seconds on 1 000 points: "
                "its numbers and figures mean nothing.")
    if built:
        return (f"This page was built with ``{' '.join(built)}``, a shorter run than the "
                f"script's defaults, so its numbers are a shorter run's. "
                f"``python tutorials/{name} --data-dir path/to/data`` runs the whole lesson.")
    return ""


def add_note(app, docname, source) -> None:
    """Sphinx's ``source-read``: put ``note(...)`` under the title of a tutorial's page."""
    if not docname.startswith("tutorials/") or docname in ("tutorials/index",
                                                           "tutorials/sg_execution_times"):
        return
    text = note(docname.split("/", 1)[1] + ".py")
    if not text:
        return
    lines = source[0].split("\n")
    for i in range(1, len(lines)):
        if lines[i] and set(lines[i]) == {"="} and len(lines[i]) >= len(lines[i - 1]) > 0:
            lines[i + 1:i + 1] = ["", ".. note::", "", "   " + text, ""]
            source[0] = "\n".join(lines)
            return


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
