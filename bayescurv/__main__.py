"""``python -m bayescurv``: the command line of :mod:`bayescurv.cli`."""

import sys

from bayescurv.cli import main

if __name__ == "__main__":
    sys.exit(main())
