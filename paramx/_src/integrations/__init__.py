"""The integrations: optax, serialization, linen, NNX and PyTorch checkpoints.

Import the core and (for what a parametrization declares) the parametrizations.
"""
