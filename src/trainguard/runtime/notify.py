"""The optional alert hook: a command (the alert on its stdin) or a webhook URL (POST).

The payload is one JSON document ending in a newline: the alert's fields (``step``,
``rank``, ``detector``, ``severity``, ``message``, ``details``) plus ``run_id``, ``host``,
``pid`` and ``time`` (UTC, ISO 8601). Hooks run in the background with a time limit, so a
slow receiver never slows training; a failed hook is reported on stderr.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import urllib.request

from trainguard.runtime.interface import Alert

TIMEOUT = 10.0


class Notifier:
    """Delivers each alert to the hook, if there is one."""

    def __init__(self, hook: str | None, run_id: str | None = None) -> None:
        self.hook = hook
        self.run_id = run_id

    def payload(self, alert: Alert) -> bytes:
        document = {
            **alert.to_dict(),
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }
        return json.dumps(document, default=str).encode() + b"\n"

    def send(self, alert: Alert) -> None:
        if not self.hook:
            return
        body = self.payload(alert)
        threading.Thread(target=self._deliver, args=(body,), daemon=True).start()

    def _deliver(self, body: bytes) -> None:
        from trainguard.runtime.sensors import quiet

        hook = self.hook or ""
        try:
            with quiet():  # this thread is the guard's own: not a sensor event
                if hook.startswith(("http://", "https://")):
                    request = urllib.request.Request(
                        hook,
                        data=body,
                        headers={"Content-Type": "application/json"},
                        method="POST",
                    )
                    with urllib.request.urlopen(request, timeout=TIMEOUT):
                        pass
                else:
                    subprocess.run(shlex.split(hook), input=body, timeout=TIMEOUT, check=False)
        except Exception as exc:  # a broken hook must not disturb training
            sys.stderr.write(f"trainguard: alert hook failed: {exc}\n")
