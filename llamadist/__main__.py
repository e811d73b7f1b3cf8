import sys

from llamadist.cli import main

sys.exit(main())
