"""Where tierlm keeps files it derives: converted models (models/) and built native kernels (kernels/)."""
from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "TIERLM_CACHE_DIR"


def cache_root() -> Path:
    """tierlm's cache root: $TIERLM_CACHE_DIR, else platformdirs' user cache dir for 'tierlm'."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("tierlm"))
