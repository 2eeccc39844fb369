import sys

from dipro.cli import main

sys.exit(main())
