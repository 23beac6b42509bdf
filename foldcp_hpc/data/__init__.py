"""Inputs: parsing, tokens, sharded features, MSAs, CCD molecules and Boltz-2 weights."""
