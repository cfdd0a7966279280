"""Deprecated path, kept for third-party plugins for one release.

The plugin manager and its registries now live in
``capbench_core.contract.registry``.
"""

import warnings

from capbench_core.contract.registry import *  # noqa: F403

warnings.warn("capbench_core.plugins is deprecated and will be removed in the next release: import from "
              "capbench_core.contract.registry instead", DeprecationWarning, stacklevel=2)
