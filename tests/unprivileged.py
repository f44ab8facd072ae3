"""Run a child process for which file permissions mean something, even when we are root.

Root reads a mode-000 file through two capabilities, CAP_DAC_OVERRIDE and
CAP_DAC_READ_SEARCH. Dropping them from the bounding set before ``exec`` leaves the child
root in name (it can still run this interpreter under /root) but bound by permission
bits like any user. Use ``preexec_fn=drop_file_privileges`` with ``subprocess``.
"""

from __future__ import annotations

import ctypes
import os

_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE = 1
_CAP_DAC_READ_SEARCH = 2


def drop_file_privileges() -> None:
    """In the child, before exec: lose the capabilities that bypass permission bits."""
    if os.getuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"cannot drop capability {cap}")


def permissions_mean_something() -> str | None:
    """None when a child can be made to honour mode bits; otherwise the reason it cannot."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        probe = os.path.join(folder, "probe")
        with open(probe, "w") as handle:
            handle.write("x")
        os.chmod(probe, 0)
        try:
            done = subprocess.run(
                [sys.executable, "-c", f"open({probe!r})"],
                preexec_fn=drop_file_privileges,
                capture_output=True,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            return f"cannot start a child without file privileges: {exc}"
        if done.returncode == 0:
            return "a mode-000 file stays readable here (capabilities could not be dropped)"
    return None
