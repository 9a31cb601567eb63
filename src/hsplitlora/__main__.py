import sys

from hsplitlora.cli import main

sys.exit(main())
