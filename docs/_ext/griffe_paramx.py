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


def _visit(name: str, path: Path, parent: griffe.Module, loader: griffe.GriffeLoader) -> Any:
    return griffe.visit(
        name,
        filepath=path,
        code=path.read_text(encoding="utf-8"),
        parent=parent,
        extensions=loader.extensions,
        docstring_parser=loader.docstring_parser,
        docstring_options=loader.docstring_options,
        lines_collection=loader.lines_collection,
    )


def _load_folder(folder: Path, parent: griffe.Module, loader: griffe.GriffeLoader) -> None:
    """Each ``*.py`` of ``folder`` as a member of ``parent``, and each subpackage likewise."""
    for path in sorted(folder.glob("*.py")):
        if path.stem == "__init__":
            continue
        parent.set_member(path.stem, _visit(path.stem, path, parent, loader))
    for sub in sorted(d for d in folder.iterdir() if (d / "__init__.py").is_file()):
        package = _visit(sub.name, sub / "__init__.py", parent, loader)
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


class DocumentBuiltFunctions(griffe.Extension):
    """Documents the functions a public module builds at import time (``paramx.nnx``'s
    torch-named functions, made from the parametrization classes): names of the module's
    runtime ``__all__`` that its source does not define are inspected from the live objects
    (their ``__signature__`` and ``__doc__``)."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "paramx":
            return
        import importlib

        for name, member in list(pkg.members.items()):
            if member.is_alias or not isinstance(member, griffe.Module) or name.startswith("_"):
                continue
            live = importlib.import_module(f"paramx.{name}")
            missing = [n for n in getattr(live, "__all__", ()) if n not in member.members]
            if not missing:
                continue
            inspected = griffe.inspect(
                f"paramx.{name}",
                filepath=member.filepath,
                docstring_parser=loader.docstring_parser,
                docstring_options=loader.docstring_options,
            )
            for n in missing:
                obj = inspected.members[n]
                obj.parent = member
                member.set_member(n, obj)
                _plain_roles(obj)
