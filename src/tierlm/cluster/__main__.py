"""`python -m tierlm.cluster [flags]`: the same as `tierlm serve` (with --replicas N: on Ray Serve)."""
import sys

from tierlm.cluster.command import main

sys.exit(main())
