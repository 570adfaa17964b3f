"""The live front ends: ``hnd explore`` (Voilà) in headless Chromium, ``hnd lab`` (JupyterLab)
through its REST API. Both bind loopback only and stop cleanly on SIGTERM.

The browser test needs Chromium and fails (not skips) without it, like the book's page check.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from browser import INSTALL_HINT, find_chromium, open_app
from hnd.book.explore import BEST_SPLIT, SplitExplorer, known_teachers
from hnd.book.plots import format_rate
from hnd.cli import main
from hnd.latency import plan
from live_app import HOST, free_port, js, ready, redraw_ms, running_explorer

ROOT = Path(__file__).resolve().parents[1]


def best_label(explorer: SplitExplorer) -> str:
    return plan(explorer.shown, explorer.rate.value, explorer.rtt.value)[0][0].label


def test_explorer_live_in_a_browser(tmp_path):
    """Start the app, change the data rate and the backbone as a reader would: it opens where the
    rate moves the best option; the best option and the figure follow what the planner says,
    rates read as people write them, nothing is fetched from the network, no error shows; every
    traced layer and the zlib ratio appear on demand; a malformed profile file is one line."""
    if find_chromium() is None:
        pytest.fail(f"Chromium is needed for the live explorer test; {INSTALL_HINT}", pytrace=False)
    # The same explorer in this process: what the page must show after each change.
    expected = SplitExplorer(tuple(known_teachers()))
    bad = tmp_path / "measured.yaml"
    bad.write_text("name: [unclosed\n")
    with running_explorer(tmp_path) as (url, port, lines):
        local = (f"http://{HOST}:{port}/", f"ws://{HOST}:{port}/")
        with open_app(url, timeout=120, local=local) as page:
            ready(page)
            summary = "document.querySelector('.hnd-summary').innerText"
            readout = "document.querySelector('.hnd-rate .widget-readout').innerText"
            assert f"Best at 10 Mbps, 20 ms RTT: {best_label(expected)}" in page.evaluate(summary)
            assert page.evaluate("document.querySelector('.hnd-device select').value") == "raspberry-pi4"
            backbones = page.evaluate("[...document.querySelectorAll('.hnd-backbone option')].map(o => o.value)")
            assert backbones == list(expected.backbone.options)  # every teacher hnd knows
            assert not page.evaluate("window.hnd.visible('hnd-zlib')")  # int8: no ratio to set
            assert min(page.evaluate("window.hnd.headerGaps('hnd-summary')")) >= 8  # the headers stay apart
            figures = {page.evaluate("window.hnd.figure()")}
            bests = {best_label(expected)}
            for rate in (0.1, 1000):
                redraw_ms(page, f"window.hnd.slider('hnd-rate', {rate})")
                expected.rate.value = rate
                bests.add(best_label(expected))
                assert f"Best at {format_rate(rate)}, 20 ms RTT: {best_label(expected)}" in page.evaluate(summary)
                assert page.evaluate(readout) == format_rate(rate, unit=False)  # 0.1, 1,000: no "e+"
                figures.add(page.evaluate("window.hnd.figure()"))
            assert len(bests) == 3  # local, the student, offloading: the rate moves the answer
            redraw_ms(page, f"window.hnd.select('hnd-backbone', {js('resnet152')})")
            expected.backbone.value = "resnet152"
            shown = page.evaluate(summary)
            assert f"Best at 1,000 Mbps, 20 ms RTT: {best_label(expected)}" in shown
            assert "resnet152 split after" in shown and "densenet169" not in shown
            figures.add(page.evaluate("window.hnd.figure()"))
            assert len(figures) == 4  # every change drew a new figure
            splits = page.evaluate("[...document.querySelectorAll('.hnd-split option')].map(o => o.value)")
            assert splits == list(expected.split.options) and splits[0] == BEST_SPLIT
            page.evaluate("window.hnd.check('hnd-every-split', true)")
            expected.every_split.value = True
            every = len(expected.split.options)
            assert every > len(splits)
            page.wait_for(f"document.querySelectorAll('.hnd-split option').length === {every}", timeout=60)
            page.evaluate(f"window.hnd.select('hnd-fmt', {js('int8+zlib')})")
            page.wait_for("window.hnd.visible('hnd-zlib')", timeout=60)

            page.evaluate(f"window.hnd.text('hnd-profile-file', {js(bad.name)})")  # relative: where it started
            message = page.wait_for("document.querySelector('.hnd-message').innerText", timeout=30)
            assert message.count("\n") == 0 and "measured.yaml is not valid YAML" in message, message

            text = page.evaluate("document.body.innerText")
            assert "Traceback" not in text and "Error" not in text
            assert page.problems == [], page.problems
            assert all(r.startswith(local + ("data:", "blob:", "about:")) for r in page.requests)
    assert any(f"explorer: {url}" in line for line in lines), lines


def test_explorer_refuses_a_busy_port_and_a_folder_without_runs(tmp_path, capsys):
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["explore", "--port", str(port)]) == 2
    assert capsys.readouterr().err.strip() == (f"hnd: error: port {port} on {HOST} is in use; choose another "
                                               "with --port")
    assert main(["explore", "--runs", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no grid runs in {tmp_path}" in err


def test_lab_serves_the_notebooks_and_stops_cleanly(tmp_path):
    """hnd lab on a free port: its contents API lists the book's notebooks, whose first code
    cell is papermill's parameters cell, and SIGTERM stops it with exit code 0."""
    port, token = free_port(), "t" * 32
    proc = subprocess.Popen([sys.executable, "-m", "hnd", "lab", "--port", str(port)], cwd=ROOT,
                            env={**os.environ, "JUPYTER_TOKEN": token},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        url = f"http://{HOST}:{port}/lab?token={token}"
        deadline = time.monotonic() + 120
        while not any(url in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        with urllib.request.urlopen(f"http://{HOST}:{port}/api/contents?token={token}", timeout=30) as reply:
            listing = json.load(reply)
        names = sorted(item["name"] for item in listing["content"] if item["type"] == "notebook")
        assert names == sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
        with urllib.request.urlopen(f"http://{HOST}:{port}/api/kernelspecs?token={token}", timeout=30) as reply:
            specs = json.load(reply)
        assert specs["default"] in specs["kernelspecs"]  # a kernel of this environment
        for name in names:
            with urllib.request.urlopen(f"http://{HOST}:{port}/api/contents/{name}?token={token}",
                                        timeout=30) as reply:
                cells = json.load(reply)["content"]["cells"]
            first = next(c for c in cells if c["cell_type"] == "code")
            assert "parameters" in first["metadata"].get("tags", []), name
        with pytest.raises(urllib.error.HTTPError, match="403"):
            urllib.request.urlopen(f"http://{HOST}:{port}/api/contents", timeout=30)  # no token: refused
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, "".join(lines)
    with pytest.raises(OSError):  # the port is closed
        urllib.request.urlopen(f"http://{HOST}:{port}/api/status", timeout=5)


@pytest.mark.parametrize("command, module", [("explore", "voila"), ("lab", "jupyterlab")])
def test_a_missing_front_end_is_one_line(command, module, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    monkeypatch.chdir(ROOT)
    assert main([command, "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"needs the `{module}` package: install the live extra" in err, err
