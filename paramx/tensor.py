"""The per-tensor API: register, materialize, assign and remove on one array or one node.

The tree functions of :mod:`paramx` select leaves by path and run these on each; code that
holds one tensor (a layer, an integration) calls them directly. Errors name the tensor by
``label`` where the tree functions name its path.

Examples:
  >>> import jax.numpy as jnp
  >>> import paramx as px
  >>> node = px.tensor.register(jnp.array([[2.0, 1.0], [1.0, 2.0]]), px.WeightNorm())
  >>> px.tensor.materialize(node)
  Array([[2., 1.],
         [1., 2.]], dtype=float32)
  >>> node = px.tensor.assign(node, jnp.eye(2))
  >>> px.tensor.remove(node)
  Array([[1., 0.],
         [0., 1.]], dtype=float32)
"""

from paramx._src.core.assign import assign_tensor as assign
from paramx._src.core.materialize import materialize_tensor as materialize
from paramx._src.core.register import register_tensor as register
from paramx._src.core.remove import remove_tensor as remove

__all__ = ["assign", "materialize", "register", "remove"]
