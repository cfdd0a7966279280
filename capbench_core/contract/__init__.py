"""What plugins see and build against: the backend and session contract, tasks and workloads, typed
backend options, the result records, hook specifications, registries and the engine-environment base.
Imports nothing of capbench but ``errors``.
"""
