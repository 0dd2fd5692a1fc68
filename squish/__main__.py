import sys

from squish.cli import main

sys.exit(main())
