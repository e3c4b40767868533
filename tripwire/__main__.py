"""Allow ``python -m tripwire``."""

import sys

from tripwire.cli import main

sys.exit(main())
