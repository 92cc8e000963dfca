import sys

from medqa.cli import main

sys.exit(main())
