"""The stages' command lines: a mistake in their input ends in one clear line, not a traceback.

What a user can fix (a params key, a data file, the tracking server, a run that diverged) is
printed as ``error: <message>`` on stderr, and the command exits with status 2. Anything else
is a bug and keeps its traceback; so does every error when ``HITNET_TRACEBACK=1``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from hitnet.data import CorpusError
from hitnet.lightning_module import TrainingDiverged
from pipeline.params import ParamsError
from pipeline.tracking import TrackingError

USER_ERRORS = (ParamsError, CorpusError, TrackingError, TrainingDiverged, FileNotFoundError)


def run_command(main: Callable[[], None]) -> None:
    try:
        main()
    except USER_ERRORS as error:
        if os.environ.get("HITNET_TRACEBACK") == "1":
            raise
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
