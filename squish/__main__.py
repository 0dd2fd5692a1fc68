import sys

from squish.cli.main import main

sys.exit(main())
