"""The core: the parametrization protocol, the node, selection by path, chain running, state,
sharding, and the tree transforms (register, assign, remove, transfer, inspect, materialize).

Imports only the standard library, JAX and numpy: nothing from the layers above.
"""
