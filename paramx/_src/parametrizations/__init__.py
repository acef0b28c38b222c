"""The parametrizations: one file per family, and their matrix numerics.

Imports the core only.
"""
