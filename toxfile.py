"""tox's hooks for this project; tox loads this file by its name.

Under CI (`CI=true`) each test environment is removed once it has run: the
environments of all three backends together take several GB (TensorFlow's,
JAX's and PyTorch's wheels each weigh hundreds of MB installed), more than a
CI machine's free disk may hold, where one at a time fits. Elsewhere they are
kept, so that the next `tox` run reuses them.
"""

from __future__ import annotations

import os
import shutil

from tox.plugin import impl
from tox.tox_env.api import ToxEnv
from tox.tox_env.runner import RunToxEnv


@impl
def tox_env_teardown(tox_env: ToxEnv) -> None:
    """Removes a test environment's directory after its run, under CI only.

    The environment that builds the wheel is kept: every test environment
    installs the wheel it built once.
    """
    if os.environ.get("CI") == "true" and isinstance(tox_env, RunToxEnv):
        shutil.rmtree(tox_env.env_dir, ignore_errors=True)
