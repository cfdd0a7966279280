"""Work built from many runs: sweeps (local or on Ray) and the sparsity study's measured mode.
"""
