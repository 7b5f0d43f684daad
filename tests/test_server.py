"""The server process's settings: the garbage collector tuned for a long-running ingest process."""

from __future__ import annotations

import subprocess
import sys

from metrics_service.server import GC_YOUNG_THRESHOLD


def test_tune_gc_freezes_start_up_objects_and_raises_the_young_threshold() -> None:
    # In a child process: the settings are process-wide.
    code = (
        "import gc; from metrics_service.server import tune_gc; before = gc.get_threshold();"
        " tune_gc(); print(gc.get_freeze_count() > 1000, before[1:] == gc.get_threshold()[1:], "
        "gc.get_threshold()[0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == ["True", "True", str(GC_YOUNG_THRESHOLD)]
