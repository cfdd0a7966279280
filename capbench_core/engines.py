"""Deprecated path, kept for third-party plugins for one release.

Engine environments (Recipe, Step, Context; install, resolve, ...) now live in
``capbench_core.contract.engine_env`` and
``capbench_core.serving.environments``.
"""

import warnings

from capbench_core.contract.engine_env import *  # noqa: F403
from capbench_core.contract.engine_env import EngineDevice
from capbench_core.serving.environments import *  # noqa: F403

Device = EngineDevice  # renamed: contract.records.Device is a hardware device

warnings.warn("capbench_core.engines is deprecated and will be removed in the next release: import from "
              "capbench_core.contract.engine_env / capbench_core.serving.environments instead", DeprecationWarning,
              stacklevel=2)
