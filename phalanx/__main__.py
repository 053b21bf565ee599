import sys

from phalanx.launch.cli import main

sys.exit(main())
