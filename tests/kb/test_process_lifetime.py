"""A worker cluster whose `serve` was killed outright stops, even when its graceful stop hangs."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]

# The child stands in for django-q's master: it ignores SIGTERM, as a master whose graceful
# stop waits for a task that does not end, and has a grandchild in its process group.
CHILD = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    from kb.ops import process_lifetime
    process_lifetime.ORPHAN_STOP_GRACE_SECONDS = 1.0
    signal.signal(signal.SIGTERM, lambda signum, frame: print("SIGTERM", flush=True))
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    process_lifetime.process_stop_with_parent(parent_pid=int(sys.argv[1]))
    print(f"ready {os.getpid()} {grandchild.pid}", flush=True)
    time.sleep(120)
""")

PARENT = textwrap.dedent("""
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid())],
                             start_new_session=True, stdout=sys.stdout)
    time.sleep(120)
""")


def test_an_orphaned_cluster_that_ignores_sigterm_is_killed_with_its_group_after_the_grace(
    tmp_path,
):
    output_path = tmp_path / "child.out"
    with open(output_path, "w") as output:
        parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD], stdout=output,
                                  cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    family = []
    try:
        deadline = time.monotonic() + 30
        while not (ready := re.search(r"ready (\d+) (\d+)\n", output_path.read_text())):
            assert time.monotonic() < deadline, output_path.read_text()
            time.sleep(0.1)
        family = [psutil.Process(int(pid)) for pid in ready.groups()]

        parent.send_signal(signal.SIGKILL)
        parent.wait()
        _, alive = psutil.wait_procs(family, timeout=15)

        assert alive == []
        assert "SIGTERM" in output_path.read_text()  # the graceful stop was asked for first
    finally:
        # Only this test's processes: the session's own servers are children of pytest too.
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for process in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
