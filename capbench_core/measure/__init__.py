"""Measuring: the load generator, the runner, energy meters, progress display and this machine's hardware
(probes' devices, measured CPU peaks, NVML).
"""
