"""Outputs: structure and confidence files in Boltz-2's layout."""
