"""The package's version, as installed (setup.py's), for `counter --version`
and /openapi.json."""

import importlib.metadata

try:
    VERSION = importlib.metadata.version("click-counter")
except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
    VERSION = "0+unknown"
