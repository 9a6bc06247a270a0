import sys

from nextrec_fast.cli import main

sys.exit(main())
