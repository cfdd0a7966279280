"""Deprecated path, kept for third-party plugins for one release.

The backend contract (Backend, Session, ModelRef, ...) now live in
``capbench_core.contract.backend``.
"""

import warnings

from capbench_core.contract.backend import *  # noqa: F403

warnings.warn("capbench_core.backend is deprecated and will be removed in the next release: import from "
              "capbench_core.contract.backend instead", DeprecationWarning, stacklevel=2)
