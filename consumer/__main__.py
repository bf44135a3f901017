"""`python -m consumer …` is the same as `cmsync …`."""

import sys

from consumer.cli import main

sys.exit(main())
