import sys

from crosspt.cli.main import main

sys.exit(main())
