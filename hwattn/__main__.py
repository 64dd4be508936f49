import sys

from hwattn.cli import main

sys.exit(main())
