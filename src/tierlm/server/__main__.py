"""`python -m tierlm.server [flags]`: the same as `tierlm serve`."""
import sys

from tierlm.server.command import main

sys.exit(main())
