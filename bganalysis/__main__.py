import sys

from bganalysis.cli import main

sys.exit(main())
