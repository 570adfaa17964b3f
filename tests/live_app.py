"""Drive the live explorer (``hnd explore``) from a test or a benchmark: start it on a free
loopback port, and change its widgets in a browser page the way a reader's hand would."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HOST = "127.0.0.1"

# Defines window.hnd in the page: set a widget (found by its hnd-* class) as a reader would and
# measure the time until the new figure is on screen.
CONTROLS_JS = r"""
window.hnd = {
  slider(cls, value) {  // type into the slider's readout and press Enter
    const r = document.querySelector(`.${cls} .widget-readout`);
    r.textContent = String(value);
    const ev = new KeyboardEvent('keydown', {key: 'Enter', bubbles: true, cancelable: true});
    Object.defineProperty(ev, 'keyCode', {get: () => 13});
    r.dispatchEvent(ev);
  },
  select(cls, value) {
    const s = document.querySelector(`.${cls} select`);
    s.value = value;
    s.dispatchEvent(new Event('change', {bubbles: true}));
  },
  text(cls, value) {
    const i = document.querySelector(`.${cls} input`);
    i.value = value;
    i.dispatchEvent(new Event('change', {bubbles: true}));
  },
  check(cls, value) {  // tick or untick a checkbox with a click
    const i = document.querySelector(`.${cls} input`);
    if (i.checked !== value) i.click();
  },
  visible(cls) {
    return getComputedStyle(document.querySelector(`.${cls}`)).display !== 'none';
  },
  headerGaps(cls) {  // pixels between the texts of neighbouring table headers
    const boxes = [...document.querySelectorAll(`.${cls} th`)].map((th) => {
      const r = document.createRange();
      r.selectNodeContents(th);
      return r.getBoundingClientRect();
    });
    return boxes.slice(1).map((b, i) => b.left - boxes[i].right);
  },
  figure() {
    const img = document.querySelector('.hnd-output img');
    return img ? img.src : null;
  },
  async redraw(action) {  // milliseconds from the change to the new figure, decoded
    const before = this.figure();
    const t0 = performance.now();
    action();
    while (performance.now() - t0 < 60000) {
      const img = document.querySelector('.hnd-output img');
      if (img && img.src !== before) {
        await img.decode();
        return performance.now() - t0;
      }
      await new Promise((r) => setTimeout(r, 5));
    }
    throw new Error('no new figure within 60 s');
  },
};
true
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_explorer(cwd: Path, *args: str, timeout: float = 120):
    """``hnd explore`` on a free port: yields (url, port, output lines so far); on leaving,
    SIGTERM must stop it with exit code 0."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hnd", "explore", "--port", str(port), *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    url = f"http://{HOST}:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while not any(url in line for line in lines):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"hnd explore did not print {url} (exit {proc.poll()}):\n{''.join(lines)}")
            time.sleep(0.1)
        yield url, port, lines
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        reader.join(timeout=5)
        if code != 0:
            raise RuntimeError(f"hnd explore exited {code} after SIGTERM:\n{''.join(lines)}")


def ready(page, timeout: float = 240) -> None:
    """Wait until the explorer's first figure is on the page, then install the controls."""
    page.wait_for("!!document.querySelector('.hnd-output img')", timeout=timeout)
    page.evaluate(CONTROLS_JS)


def redraw_ms(page, action: str) -> float:
    """Milliseconds from ``action`` (JavaScript calling window.hnd) to the new figure."""
    return page.evaluate(f"window.hnd.redraw(() => {action})", timeout=90)


def js(value) -> str:
    return json.dumps(value)
