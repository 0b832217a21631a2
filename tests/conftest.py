import os
import sys
from pathlib import Path

from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))

# `make test` (and so CI) draws the same hypothesis examples on every run, so a result can be
# reproduced and a pass here is a pass there; HYPOTHESIS_PROFILE=explore draws fresh ones.
settings.register_profile("repeatable", deadline=None, derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
