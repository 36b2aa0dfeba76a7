"""python -m leanvm"""

import sys

from leanvm.cli.main import main

sys.exit(main())
