"""Time limits for the tests' subprocesses.

A limit only exists to stop a child that hangs; it must never fail a test because the machine is busy (a loaded
2-core machine runs these children several times slower than an idle one). `MOBILEDISTILL_TEST_TIMEOUT` (seconds)
overrides the default of one hour.
"""

import os

SUBPROCESS_TIMEOUT = float(os.environ.get("MOBILEDISTILL_TEST_TIMEOUT", "3600"))
