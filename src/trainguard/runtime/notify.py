"""The optional alert hook: a command (alert JSON on its stdin) or a webhook URL (POST).

Hooks run in the background with a time limit, so a slow receiver never slows training.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import threading
import urllib.request

from trainguard.runtime.interface import Alert

TIMEOUT = 10.0


class Notifier:
    def __init__(self, hook: str | None) -> None:
        self.hook = hook

    def send(self, alert: Alert) -> None:
        if not self.hook:
            return
        body = json.dumps(alert.to_dict(), default=str).encode()
        threading.Thread(target=self._deliver, args=(body,), daemon=True).start()

    def _deliver(self, body: bytes) -> None:
        from trainguard.runtime.sensors import QUIET

        QUIET.on = True  # this thread is the guard's own: not a sensor event
        hook = self.hook or ""
        try:
            if hook.startswith(("http://", "https://")):
                request = urllib.request.Request(
                    hook, data=body, headers={"Content-Type": "application/json"}, method="POST"
                )
                with urllib.request.urlopen(request, timeout=TIMEOUT):
                    pass
            else:
                subprocess.run(shlex.split(hook), input=body, timeout=TIMEOUT, check=False)
        except Exception as exc:  # a broken hook must not disturb training
            sys.stderr.write(f"trainguard: alert hook failed: {exc}\n")
