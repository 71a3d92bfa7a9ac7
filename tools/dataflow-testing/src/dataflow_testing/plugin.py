"""pytest plugin: fixtures starting real services on loopback (loaded via the pytest11 entry point).

Service modules add their fixtures here by import, e.g. ``from dataflow_testing.redis import *``.
"""

from dataflow_testing.mooncake import *  # noqa: F403
from dataflow_testing.redis import *  # noqa: F403
