"""Deprecated path, kept for third-party plugins for one release.

The OpenAI streaming client now lives in
``capbench_core.serving.openai_client``.
"""

import warnings

from capbench_core.serving.openai_client import *  # noqa: F403

warnings.warn("capbench_core.openai_client is deprecated and will be removed in the next release: import from "
              "capbench_core.serving.openai_client instead", DeprecationWarning, stacklevel=2)
