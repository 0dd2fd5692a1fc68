import sys

from benchmarks.baseline.cli import main

sys.exit(main())
