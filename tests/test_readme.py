"""The README's Python examples run as written, and its two commands are where CI finds them."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
README = (ROOT / "README.md").read_text()


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "the README has no python example"
    for code in blocks:
        run = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, run.stderr[-3000:]


def test_readme_has_exactly_two_marked_commands():
    markers = re.findall(r"<!-- ci:(\w+)-command -->\n```bash\n(.+?)\n```", README)
    assert [m[0] for m in markers] == ["main", "test"]
    main, test = (m[1] for m in markers)
    assert "examples/quickstart.py" in main and "pytest" in test
    assert "pip install" in main and "pip install" in test
