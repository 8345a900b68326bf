"""Session-wide test settings."""

import os

# Several test workers describe TPU topologies (ahead-of-time compiles, no TPU) at once; by
# default libtpu allows one process per machine and the second fails on its lockfile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
