"""torch-named functions (``orthogonal(module, name="kernel", ...)``), built from what a
parametrization class declares.

A parametrization class offers a torch-named function by declaring, as class attributes:

* ``torch_function``: the function's name (torch's: ``"orthogonal"``);
* ``torch_function_positional``: the constructor options that follow ``module, name``
  positionally, in torch's order;
* ``torch_function_keyword``: the constructor options that are keyword-only;
* ``torch_function_takes_key``: whether the function takes a PRNG ``key`` (for an ``init``
  that draws);
* ``nnx_doc``: the function's docstring, with a runnable example.

:func:`torch_function` turns such a class into ``f(module, name="kernel", *positional,
*, *keyword, [key=None,] batch_axes=0)``, whose defaults are the class's, and which
registers ``cls(**options)`` with :func:`register_parametrization`. ``paramx.nnx`` builds
one for every built-in that declares ``torch_function``; nothing here names a built-in.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import jax
from flax import nnx

from paramx._src.integrations.nnx.register import register_parametrization

_P = inspect.Parameter


def _declared(cls: type, attr: str, kind: type) -> Any:
    value = getattr(cls, attr, None)
    if not isinstance(value, kind):
        raise TypeError(
            f"{cls.__name__} declares `torch_function`, so it must also declare `{attr}` as a "
            f"{kind.__name__}; got {type(value).__name__}. See "
            f"paramx._src.integrations.nnx.wrappers for what a torch-named function needs."
        )
    return value


def torch_function(cls: type) -> Callable[..., nnx.Module]:
    """The torch-named NNX function of a parametrization class that declares
    ``torch_function``.

    Args:
      cls: The parametrization class (its constructor takes the declared options).

    Returns:
      The function, named ``cls.torch_function``, with ``cls.nnx_doc`` as its docstring.

    Raises:
      TypeError: If a declaration is missing or names an option the constructor lacks.

    Examples:
      >>> import inspect
      >>> import paramx as px
      >>> from paramx._src.integrations.nnx.wrappers import torch_function
      >>> f = torch_function(px.WeightNorm)
      >>> f.__name__, str(inspect.signature(f))
      ('weight_norm', "(module: 'nnx.Module', name: 'str' = 'kernel', dim: 'int | None' = -1, *, batch_axes: 'int' = 0) -> 'nnx.Module'")
    """  # noqa: E501
    name = _declared(cls, "torch_function", str)
    positional = _declared(cls, "torch_function_positional", tuple)
    keyword = _declared(cls, "torch_function_keyword", tuple)
    takes_key = _declared(cls, "torch_function_takes_key", bool)
    doc = _declared(cls, "nnx_doc", str)
    options = inspect.signature(cls).parameters
    unknown = [o for o in (*positional, *keyword) if o not in options]
    if unknown:
        raise TypeError(
            f"{cls.__name__} declares the options {unknown} for {name}, but its constructor "
            f"takes {list(options)}."
        )
    params = [
        _P("module", _P.POSITIONAL_OR_KEYWORD, annotation="nnx.Module"),
        _P("name", _P.POSITIONAL_OR_KEYWORD, default="kernel", annotation="str"),
        *(options[o].replace(kind=_P.POSITIONAL_OR_KEYWORD) for o in positional),
        *(options[o].replace(kind=_P.KEYWORD_ONLY) for o in keyword),
    ]
    if takes_key:
        params.append(_P("key", _P.KEYWORD_ONLY, default=None, annotation="jax.Array | None"))
    params.append(_P("batch_axes", _P.KEYWORD_ONLY, default=0, annotation="int"))
    signature = inspect.Signature(params, return_annotation="nnx.Module")

    def function(*args: Any, **kwargs: Any) -> nnx.Module:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        given = bound.arguments
        p = cls(**{o: given[o] for o in (*positional, *keyword)})
        key: jax.Array | None = given.get("key")
        return register_parametrization(
            given["module"], given["name"], p, key=key, batch_axes=given["batch_axes"]
        )

    function.__name__ = function.__qualname__ = name
    function.__doc__ = doc
    function.__signature__ = signature  # type: ignore[attr-defined]
    function.__module__ = "paramx.nnx"
    return function


def torch_functions(classes: Iterable[type]) -> dict[str, Callable[..., nnx.Module]]:
    """``{name: function}`` for each class of ``classes`` that declares ``torch_function``.

    Examples:
      >>> import paramx as px
      >>> from paramx._src.integrations.nnx.wrappers import torch_functions
      >>> sorted(torch_functions([px.Orthogonal, px.SpectralNorm, px.Parametrization]))
      ['orthogonal', 'spectral_norm']
    """
    out: dict[str, Callable[..., nnx.Module]] = {}
    for cls in classes:
        if getattr(cls, "torch_function", None) is None:
            continue
        function = torch_function(cls)
        if function.__name__ in out:
            raise ValueError(
                f"Two parametrization classes declare torch_function {function.__name__!r}."
            )
        out[function.__name__] = function
    return out
