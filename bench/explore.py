"""Redraw time of the live split explorer (``hnd explore``), measured in a browser.

Starts the app on a free loopback port, opens it in headless Chromium (the test suite's
DevTools-pipe driver, tests/browser.py) and changes one control at a time as a reader would:
the data-rate slider, the RTT slider, channels, number format, device, teacher split and
backbone. Each sample is the time from the change in the page to the new figure decoded in
it (the kernel's recomputation, the PNG and the round trip through the websocket included).
Prints per control: samples, median and maximum milliseconds; then the median over all.

Goal: median well under a second on a 2-core CPU. A backbone's first visit analyses it
(a torch.fx trace on the meta device), so its samples are the slowest. Run from the repository
root (needs Chromium and the live extra):
    python bench/explore.py [--runs runs/book/cpu] [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the browser driver lives there

from browser import open_app  # noqa: E402
from live_app import HOST, js, ready, redraw_ms, running_explorer  # noqa: E402

GOAL_MS = 1000.0


def changes(repeats: int) -> list[tuple[str, str]]:
    """(control, JavaScript) pairs: each moves one control to a new value."""
    out = []
    for _ in range(repeats):
        out += [("rate", f"window.hnd.slider('hnd-rate', {r})") for r in (0.2, 3, 40, 500)]
        out += [("rtt", f"window.hnd.slider('hnd-rtt', {t})") for t in (5, 80)]
        out += [("channels", f"window.hnd.select('hnd-channels', {js(c)})") for c in ("12", "3")]
        out += [("format", f"window.hnd.select('hnd-fmt', {js(f)})") for f in ("fp16", "int8")]
        out += [("device", f"window.hnd.select('hnd-device', {js(d)})") for d in ("this-machine", "raspberry-pi4")]
    out += [("teacher split", "window.hnd.select('hnd-split', "
                              "document.querySelector('.hnd-split select').options[2].value)")]
    out += [("backbone", f"window.hnd.select('hnd-backbone', {js(b)})")
            for b in ("resnet152", "inception_v3", "densenet169")]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="", help="book runs whose accuracies the app shows (default none)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the cheap controls (default 3)")
    parser.add_argument("--json", help="also write the samples here")
    args = parser.parse_args()
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as cwd, running_explorer(Path(cwd), "--runs", args.runs) as (url, port, _):
        local = (f"http://{HOST}:{port}/", f"ws://{HOST}:{port}/")
        with open_app(url, timeout=120, local=local) as page:
            ready(page)
            for control, action in changes(args.repeats):
                samples.setdefault(control, []).append(redraw_ms(page, action))
            problems = page.problems
    print(f"{'control':14s} {'n':>3s} {'median ms':>10s} {'max ms':>8s}")
    for control, ms in samples.items():
        print(f"{control:14s} {len(ms):3d} {statistics.median(ms):10.0f} {max(ms):8.0f}")
    every = [m for ms in samples.values() for m in ms]
    median = statistics.median(every)
    print(f"{'all':14s} {len(every):3d} {median:10.0f} {max(every):8.0f}   goal: median < {GOAL_MS:.0f} ms "
          f"({'met' if median < GOAL_MS else 'missed'})")
    if problems:
        print("page problems:", *problems, sep="\n  ")
    if args.json:
        Path(args.json).write_text(json.dumps({"samples_ms": samples, "median_ms": median}, indent=1) + "\n")


if __name__ == "__main__":
    main()
