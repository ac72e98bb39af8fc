"""Intersphinx inventories that need no network.

Python's ``objects.inv`` is stored as published (``python.inv``). For PyTorch, Pyro and
NumPy, ``<name>.txt`` lists, in the plain-text form of an ``objects.inv``, the objects
these pages link to; ``write()`` compresses each into the ``.inv`` file Sphinx reads. See
``docs/_inventories/README.md`` for where each entry comes from and how to refresh them.
"""

import zlib
from pathlib import Path

FOLDER = Path(__file__).resolve().parents[1] / "_inventories"


def write(name: str, target: Path) -> Path:
    """``FOLDER/<name>.txt`` as a compressed inventory at ``target``; the path written."""
    lines = (FOLDER / f"{name}.txt").read_text().splitlines()
    header = [line for line in lines[:4] if line.startswith("#")]
    body = [line for line in lines[len(header):] if line.strip() and not line.startswith("#")]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes("\n".join(header).encode() + b"\n"
                       + zlib.compress(("\n".join(body) + "\n").encode(), 9))
    return target


def location(name: str, build_dir: Path) -> str:
    """The inventory file of ``name`` for ``intersphinx_mapping``."""
    stored = FOLDER / f"{name}.inv"
    if stored.exists():
        return str(stored)
    return str(write(name, build_dir / "inventories" / f"{name}.inv"))
