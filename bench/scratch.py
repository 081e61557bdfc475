"""A benchmark run's own directory: its logs, state and the simulated workers' specs."""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A fresh directory for one run, removed when the run ends; a run that fails keeps
    it, and says where on stderr, for its logs."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    except BaseException:
        print(f"the run's logs and state are kept in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)
