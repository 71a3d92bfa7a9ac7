"""``python -m dataflow.launch.cli``: the same as the ``dataflow-launch`` command."""

import sys

from dataflow.launch.cli.app import main

sys.exit(main())
