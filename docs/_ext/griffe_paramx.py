"""A griffe extension for the API reference (mkdocs.yml loads it through mkdocstrings).

- Loads ``paramx._src``. That folder has no ``__init__.py`` (so that ``help(paramx)`` does not
  list it), and griffe does not load a namespace folder inside a regular package; without
  this, the re-exported names of ``paramx`` cannot be resolved to their definitions.
- Turns the Sphinx roles of the docstrings (``:class:`paramx.Orthogonal```) into inline code,
  which Markdown shows as code (they would otherwise be printed as they are).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc):`~?([^`]+)`")


def _plain_roles(obj: griffe.Object) -> None:
    if obj.docstring is not None:
        obj.docstring.value = _ROLE.sub(r"`\1`", obj.docstring.value)
    for member in obj.members.values():
        if not member.is_alias:
            _plain_roles(member)


class LoadPrivateSources(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "paramx" or "_src" in pkg.members:
            return
        folder = Path(pkg.filepath).parent / "_src"
        src = griffe.Module("_src", filepath=[folder], parent=pkg)
        pkg.set_member("_src", src)
        for path in sorted(folder.glob("*.py")):
            module = griffe.visit(
                path.stem,
                filepath=path,
                code=path.read_text(encoding="utf-8"),
                parent=src,
                extensions=loader.extensions,
                docstring_parser=loader.docstring_parser,
                docstring_options=loader.docstring_options,
                lines_collection=loader.lines_collection,
            )
            src.set_member(path.stem, module)
        _plain_roles(pkg)
