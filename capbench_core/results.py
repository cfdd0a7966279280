"""Deprecated path, kept for third-party plugins for one release.

The result records (RunResult, Metrics, HardwareSpec, ...) now live in
``capbench_core.contract.records``.
"""

import warnings

from capbench_core.contract.records import *  # noqa: F403
from capbench_core.contract.records import EngineInfo

EngineRecord = EngineInfo  # one engine record type now

warnings.warn("capbench_core.results is deprecated and will be removed in the next release: import from "
              "capbench_core.contract.records instead", DeprecationWarning, stacklevel=2)
