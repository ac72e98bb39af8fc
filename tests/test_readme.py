"""Every Python code block of README.md runs as printed, in a fresh process and an empty
working folder, and leaves nothing behind there."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

BLOCKS = re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(),
                    re.M | re.S)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 2  # Python, and a model of your own


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs_as_printed(index, tmp_path, data_root):
    env = dict(os.environ, PYRO_VAE_DATA=str(data_root.resolve()), MPLBACKEND="Agg")
    r = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"block {index + 1}:\n{BLOCKS[index]}\n{r.stderr[-3000:]}"
    assert list(tmp_path.iterdir()) == [], "the block wrote into the working folder"
