"""Every Python block of README.md and docs/*.md runs as pasted, and the README's two commands
are where CI finds them.

Each file's ```python blocks run in order in one fresh interpreter, so a later block may use
the names an earlier one defined (as a reader pasting them one after the other would). A block
that cannot run as is must say so on its first line, visibly, with a reason:
``# not runnable: <why>``; the test skips it and checks that the reason is there.
"""

import re
import textwrap

import pytest
from conftest import ROOT, run_python

README = (ROOT / "README.md").read_text()
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUNNABLE = re.compile(r"# not runnable: \S")
FENCE = re.compile(r"^([ \t]*)```python[ \t]*\n(.*?)^\1```[ \t]*$", flags=re.S | re.M)


def python_blocks(text):
    """``(line, code)`` for each ```python block (list-item indentation removed)."""
    return [
        (text.count("\n", 0, m.start()) + 2, textwrap.dedent(m.group(2)))
        for m in FENCE.finditer(text)
    ]


RUNNER = r"""
import sys, traceback
path = sys.argv[1]
blocks = {blocks!r}
namespace = {{"__name__": "__main__"}}
for line, code in blocks:
    try:
        exec(compile(code, f"{{path}}, block at line {{line}}", "exec"), namespace)
    except BaseException:
        print(f"FAILED: {{path}}, the block starting at line {{line}}:", file=sys.stderr)
        traceback.print_exc()
        sys.exit(1)
print("ran", len(blocks), "blocks")
"""


def test_the_fence_parser_finds_indented_blocks_and_markers():
    text = "a\n\n```python\nx = 1\n```\n\n- item\n\n  ```python\n  y = x\n  ```\n"
    assert python_blocks(text) == [(4, "x = 1\n"), (10, "y = x\n")]
    assert NOT_RUNNABLE.match("# not runnable: needs torch") and not NOT_RUNNABLE.match("x")


@pytest.mark.parametrize("path", DOC_FILES, ids=[p.name for p in DOC_FILES])
def test_python_blocks_run_as_pasted(path, monkeypatch):
    blocks = python_blocks(path.read_text())
    runnable = [(line, code) for line, code in blocks if not NOT_RUNNABLE.match(code)]
    if not blocks:
        pytest.skip(f"{path.name} has no python block")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    script = RUNNER.format(blocks=runnable)
    run = run_python("-c", script, str(path.relative_to(ROOT)), timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]


def test_not_runnable_blocks_say_why():
    for path in DOC_FILES:
        for line, code in python_blocks(path.read_text()):
            first = code.splitlines()[0] if code.strip() else ""
            if "not runnable" in first:
                assert NOT_RUNNABLE.match(first), f"{path.name}:{line}: give a reason: {first}"


def test_readme_has_exactly_two_marked_commands():
    markers = re.findall(r"<!-- ci:(\w+)-command -->\n```bash\n(.+?)\n```", README)
    assert [m[0] for m in markers] == ["main", "test"]
    main, test = (m[1] for m in markers)
    assert "examples/quickstart.py" in main and "pytest" in test
    assert "pip install" in main and "pip install" in test
    assert main.endswith("examples/quickstart.py")  # no --out: the figure goes to a temp folder


def test_readme_opens_with_a_builtin_then_a_custom_parametrization():
    blocks = [code for _, code in python_blocks(README)]
    assert "px.orthogonal(model.init(" in blocks[0] and "px.materialize(tree)" in blocks[0]
    assert len(blocks[0].strip().splitlines()) <= 10
    assert "px.Parametrization(" in blocks[2]
    assert "## Common mistakes" in README
    table = README[README.index("## Coming from PyTorch") :]
    assert "m.parameters()" in table and "split_state" in table


def test_common_mistakes_fail_loudly_as_the_readme_says():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    import paramx as px

    model = nn.Dense(3)
    x = jnp.ones((2, 3), jnp.float32)
    tree = px.orthogonal(model.init(jax.random.key(0), x), "params/kernel")
    # (a) the registered tree given to the model
    with pytest.raises(TypeError, match="materialize"):
        model.apply(tree, x)
    # (b) differentiating with respect to the unsplit tree (orthogonal's base is state)
    loss = lambda t: jnp.sum(model.apply(px.materialize(t), x))
    with pytest.raises(Exception, match="split_state"):
        jax.grad(loss)(tree)
    params, state = px.split_state(tree)
    grads = jax.grad(lambda p: loss(px.merge_state(p, state)))(params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    # (e) linen: a mutable state collection without the train/eval flag
    net = px.linen.Parametrize(nn.Dense(3), {"kernel": px.SpectralNorm()})
    variables = net.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="use_running_average"):
        net.apply(variables, x, mutable=["paramx_state"])
    _, updated = net.apply(variables, x, use_running_average=False, mutable=["paramx_state"])
    assert "paramx_state" in updated
