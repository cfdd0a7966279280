"""Sharing results: bundles, signatures, the verifier that re-derives every figure, and the JSON Schemas.
"""
