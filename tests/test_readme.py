"""The README's Python examples run as written, and its two commands are where CI finds them."""

import re

from conftest import ROOT, run_python

README = (ROOT / "README.md").read_text()


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "the README has no python example"
    for code in blocks:
        run = run_python("-c", code, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]


def test_readme_has_exactly_two_marked_commands():
    markers = re.findall(r"<!-- ci:(\w+)-command -->\n```bash\n(.+?)\n```", README)
    assert [m[0] for m in markers] == ["main", "test"]
    main, test = (m[1] for m in markers)
    assert "examples/quickstart.py" in main and "pytest" in test
    assert "pip install" in main and "pip install" in test
