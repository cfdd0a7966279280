"""Numbers from numbers: model analytics (parameters, FLOPs, bytes, KV), metric formulas and the figures of
a measured window, peers' conventions, MoE-CAP's formulas, the loss law, cost models, the accelerator
datasheet and how runs are grouped. No I/O beyond reading the shipped tables.
"""
