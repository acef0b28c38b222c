"""A griffe extension for the API reference (mkdocs.yml loads it through mkdocstrings).

- Loads ``paramx._src`` and its layers (``core``, ``parametrizations``, ``integrations``).
  That folder has no ``__init__.py`` (so that ``help(paramx)`` does not list it), and griffe
  does not load a namespace folder inside a regular package; without this, the re-exported
  names of ``paramx`` cannot be resolved to their definitions.
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


def _load_folder(folder: Path, parent: griffe.Module, loader: griffe.GriffeLoader) -> None:
    """Each ``*.py`` of ``folder`` as a member of ``parent``, and each subpackage likewise."""
    for path in sorted(folder.glob("*.py")):
        if path.stem == "__init__":
            continue
        module = griffe.visit(
            path.stem,
            filepath=path,
            code=path.read_text(encoding="utf-8"),
            parent=parent,
            extensions=loader.extensions,
            docstring_parser=loader.docstring_parser,
            docstring_options=loader.docstring_options,
            lines_collection=loader.lines_collection,
        )
        parent.set_member(path.stem, module)
    for sub in sorted(d for d in folder.iterdir() if (d / "__init__.py").is_file()):
        package = griffe.Module(sub.name, filepath=sub / "__init__.py", parent=parent)
        parent.set_member(sub.name, package)
        _load_folder(sub, package, loader)


class LoadPrivateSources(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "paramx" or "_src" in pkg.members:
            return
        folder = Path(pkg.filepath).parent / "_src"
        src = griffe.Module("_src", filepath=[folder], parent=pkg)
        pkg.set_member("_src", src)
        _load_folder(folder, src, loader)
        _plain_roles(pkg)
