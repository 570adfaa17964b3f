"""Check rendered HTML pages in headless Chromium, without any Python dependency.

The book must work offline: every image, script and font has to be present,
no page may fetch from a CDN, saved ipywidgets must render from their embedded
state and MathJax must typeset.  ``check_pages`` opens each page in Chromium,
driven through the DevTools protocol over ``--remote-debugging-pipe`` (fd 3
carries commands to the browser, fd 4 its replies and events; each message is
JSON followed by a NUL byte), and lists what went wrong on each page.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

INSTALL_HINT = "install it with `apt-get install -y chromium` or point HND_CHROMIUM at a Chrome binary"

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--window-size=1280,1024", "--remote-debugging-pipe",
]

# Schemes a page may load from; anything else (http, https, ws, ...) means the
# page depends on the network at view time.
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")

# Seconds to wait after the load event for widgets, MathJax and images to settle.
SETTLE = 10.0

# Problems that are known to be harmless, as (regular expression, reason).
KNOWN_HARMLESS = (
    (r"Identifier 'THEBE_JS_URL' has already been declared",
     "Sphinx 7.4 writes the inline scripts that extensions add after the builder "
     "started twice (None vs '' file names defeat its de-duplication); sphinx-thebe's "
     "copy declares consts, so the second copy throws while the first one works"),
)

# Evaluated in the page: the state of widgets, math and images, as JSON.
PAGE_STATE_JS = r"""
(() => {
  const views = [...document.querySelectorAll(
      'script[type="application/vnd.jupyter.widget-view+json"]')];
  const widgets = views.map((tag) => {
    // The widget manager inserts <div class="widget-subarea"> right before the
    // view's script tag and displays the view (class jupyter-widgets) in it.
    const area = tag.previousElementSibling;
    const isArea = !!area && area.classList.contains('widget-subarea');
    // A widget manager loaded twice inserts a second area before the same tag.
    let areas = 0;
    for (let el = area; el && el.classList.contains('widget-subarea'); el = el.previousElementSibling) {
      areas += 1;
    }
    const drawn = isArea ? [...area.querySelectorAll('.jupyter-widgets')] : [];
    return {
      rendered: isArea && !!area.querySelector('.jupyter-widgets, .lm-Widget'),
      error: isArea && !!area.querySelector('.jupyter-widgets-error-widget'),
      areas,
      // e.g. widget-vbox, widget-slider: what was drawn, for tests to look at
      kinds: [...new Set(drawn.flatMap((el) => [...el.classList].filter(
          (c) => c.startsWith('widget-') && c !== 'widget-inline-hbox')))],
    };
  });
  const images = [...document.images].map((img) => {
    if (img.loading === 'lazy') img.loading = 'eager';  // load what is off screen too
    const box = img.getBoundingClientRect();
    return {
      src: img.getAttribute('src') || img.currentSrc || '',
      complete: img.complete,
      natural: img.naturalWidth,
      width: box.width,
      height: box.height,
      visible: img.checkVisibility ? img.checkVisibility() : img.offsetParent !== null,
      inWidget: !!img.closest('.widget-subarea'),
    };
  });
  // Tables wider than the text column make the reader scroll sideways. The column is the
  // article's content box (the theme's <main> also holds the page's table of contents).
  const column = document.querySelector('article') || document.querySelector('main');
  const padding = (el) => {
    const style = getComputedStyle(el);
    return parseFloat(style.paddingLeft) + parseFloat(style.paddingRight);
  };
  const limit = column ? column.clientWidth - padding(column) : window.innerWidth;
  // So does a table in a scrolling box narrower than the table (a vertical scrollbar
  // takes its width from the box): the box's width, 0 where no box scrolls sideways.
  const sideways = (t) => {
    for (let el = t.parentElement; el && el !== column; el = el.parentElement) {
      const style = getComputedStyle(el).overflowX;
      if ((style === 'auto' || style === 'scroll') && el.scrollWidth > el.clientWidth + 1) {
        return Math.round(el.clientWidth);
      }
    }
    return 0;
  };
  const wideTables = [...document.querySelectorAll('table')].map((t) => ({
    width: Math.round(t.getBoundingClientRect().width), box: sideways(t),
  })).filter((t) => t.width > limit + 1 || t.box > 0);
  // A Markdown table that was rendered as text: a line of pipes and dashes (Sphinx's
  // smart quotes turn --- into an em dash) outside code.
  const separator = /^\s*\|?(\s*:?[-\u2013\u2014]+:?\s*\|)+\s*(:?[-\u2013\u2014]+:?\s*)?$/;
  const texts = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const rawTables = [];
  for (let node = texts.nextNode(); node; node = texts.nextNode()) {
    if (node.parentElement.closest('pre, code, script, style, textarea')) continue;
    if (node.textContent.split('\n').some((line) => separator.test(line))) {
      rawTables.push(node.textContent.trim().replace(/\s+/g, ' ').slice(0, 60));
    }
  }
  const math = [...document.querySelectorAll('.math')];
  const mj = window.MathJax;
  if (mj && mj.startup && mj.startup.promise && window.__checkMathDone === undefined) {
    window.__checkMathDone = false;
    mj.startup.promise.then(() => { window.__checkMathDone = true; },
                            () => { window.__checkMathDone = true; });
  }
  return JSON.stringify({
    url: location.href,
    ready: document.readyState,
    widgets,
    images,
    wideTables,
    rawTables,
    column: Math.round(limit),
    math: math.length,
    untypeset: math.filter((el) => !el.querySelector('mjx-container')).length,
    mathErrors: [...document.querySelectorAll('mjx-merror')].map(
        (el) => el.getAttribute('data-mjx-error') || el.textContent),
    mathDone: window.__checkMathDone === true,
    mathJax: !!(mj && mj.startup),
    // Without require.js and embed-amd.js on the page no widget can ever render.
    widgetManager: typeof window.requirejs === 'function' &&
        !!document.querySelector('script[src*="embed-amd"]'),
  });
})()
"""


def find_chromium() -> str | None:
    """The Chromium/Chrome executable: $HND_CHROMIUM, else the first one on PATH."""
    env = os.environ.get("HND_CHROMIUM")
    if env:
        return env
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class _Browser:
    """One headless Chromium process and its DevTools pipe (flat sessions)."""

    def __init__(self, exe: str, profile: str, timeout: float):
        self.timeout = timeout
        self.events: queue.Queue = queue.Queue()
        self.backlog: list[dict] = []
        self.next_id = 0
        cmd_r, self.cmd_w = os.pipe()
        self.resp_r, resp_w = os.pipe()
        # Chromium expects the pipe ends exactly at fds 3 and 4.  Copies above
        # 10 cannot collide with 3/4 while they are moved there in the child.
        high_r = fcntl.fcntl(cmd_r, fcntl.F_DUPFD_CLOEXEC, 10)
        high_w = fcntl.fcntl(resp_w, fcntl.F_DUPFD_CLOEXEC, 10)

        def place_fds() -> None:
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        try:
            self.proc = subprocess.Popen(
                [exe, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                pass_fds=(3, 4), preexec_fn=place_fds)
        except OSError as exc:
            for fd in (cmd_r, resp_w, high_r, high_w, self.cmd_w, self.resp_r):
                os.close(fd)
            raise RuntimeError(f"cannot start Chromium ({exe}): {exc}; {INSTALL_HINT}") from exc
        for fd in (cmd_r, resp_w, high_r, high_w):
            os.close(fd)
        self.stderr_tail: list[bytes] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.stderr_thread = threading.Thread(target=self._drain_stderr, daemon=True)
        self.stderr_thread.start()

    def _read(self) -> None:
        """Split the reply pipe into messages; None marks the end of the pipe."""
        buf = b""
        while True:
            try:
                chunk = os.read(self.resp_r, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                self.events.put(None)
                return
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for raw in messages:
                if raw:
                    self.events.put(json.loads(raw))

    def _drain_stderr(self) -> None:
        """Keep Chromium's stderr flowing and remember its end for error messages."""
        for line in self.proc.stderr:
            self.stderr_tail = (self.stderr_tail + [line])[-20:]

    def _next(self, deadline: float) -> dict | None:
        """The next message from the browser, or None when ``deadline`` passed."""
        wait = deadline - time.monotonic()
        if wait <= 0:
            return None
        try:
            msg = self.events.get(timeout=wait)
        except queue.Empty:
            return None
        if msg is None:
            self.events.put(None)
            tail = b"".join(self.stderr_tail).decode(errors="replace").strip()
            raise RuntimeError(f"Chromium closed the DevTools pipe (exit code "
                               f"{self.proc.poll()}); stderr tail:\n{tail}")
        return msg

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        """Write one command to the browser; returns its id."""
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        try:
            while data:
                data = data[os.write(self.cmd_w, data):]
        except OSError as exc:
            raise RuntimeError(f"Chromium is not running: {exc}") from exc
        return self.next_id

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float | None = None) -> dict:
        """Send a command and wait for its reply; events seen meanwhile are kept."""
        cid = self.send(method, params, session)
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            msg = self._next(deadline)
            if msg is None:
                raise TimeoutError(f"no reply to {method} within {timeout or self.timeout:.0f} s")
            if msg.get("id") == cid:
                if "error" in msg:
                    raise RuntimeError(f"{method} failed: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.backlog.append(msg)

    def event(self, deadline: float) -> dict | None:
        """The next event (kept ones first), or None when ``deadline`` passed."""
        while True:
            if self.backlog:
                return self.backlog.pop(0)
            msg = self._next(deadline)
            if msg is None or "method" in msg:
                return msg

    def close(self) -> None:
        """Ask Chromium to quit, then kill it if it does not."""
        try:
            if self.proc.poll() is None:
                self.send("Browser.close")
                self.proc.wait(timeout=5)
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.stderr_thread.join(timeout=2)
            if not self.stderr_thread.is_alive():
                self.proc.stderr.close()
            for fd in (self.cmd_w, self.resp_r):
                try:
                    os.close(fd)
                except OSError:
                    pass


class _PageLog:
    """What happened while one page loaded: requests, failures, console errors.
    ``local``: URL prefixes a page may load from (a local app adds its own origin)."""

    def __init__(self, local: tuple[str, ...] = LOCAL_SCHEMES):
        self.local = local
        self.requests: list[str] = []
        self.problems: list[str] = []
        self.urls: dict[str, str] = {}
        self.loaded = False

    def add(self, event: dict) -> None:
        """Take note of one DevTools event of the page's tab."""
        method, p = event["method"], event.get("params", {})
        if method == "Network.requestWillBeSent":
            url = p["request"]["url"]
            self.urls[p["requestId"]] = url
            self.requests.append(url)
            if not url.startswith(self.local):
                self.problems.append(f"request to the network: {_short(url)}")
        elif method == "Network.webSocketCreated":
            self.requests.append(p["url"])
            if not p["url"].startswith(self.local):
                self.problems.append(f"websocket to the network: {_short(p['url'])}")
        elif method == "Network.loadingFailed":
            if not p.get("canceled"):
                url = self.urls.get(p["requestId"], "?")
                self.problems.append(f"failed to load {_short(url)}: {p.get('errorText', '')}")
        elif method == "Network.responseReceived":
            status = p["response"].get("status", 0)
            if status >= 400:
                self.problems.append(f"HTTP {status} for {_short(p['response']['url'])}")
        elif method == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
            text = " ".join(_remote_text(a) for a in p.get("args", []))
            self.problems.append(f"console.{p['type']}: {text}")
        elif method == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            text = d.get("exception", {}).get("description") or d.get("text", "")
            where = f" ({d['url']}:{d.get('lineNumber', 0) + 1})" if d.get("url") else ""
            self.problems.append(f"uncaught exception: {text.splitlines()[0] if text else '?'}{where}")
        elif method == "Log.entryAdded":
            entry = p["entry"]
            # Network failures already come from Network.loadingFailed.
            if entry["level"] == "error" and entry.get("source") != "network":
                self.problems.append(f"browser error ({entry.get('source')}): {entry['text']}")
        elif method == "Page.loadEventFired":
            self.loaded = True


def _remote_text(arg: dict) -> str:
    """A console argument as text."""
    if "value" in arg:
        return str(arg["value"])
    return arg.get("description") or arg.get("unserializableValue") or arg.get("type", "")


def _short(url: str, limit: int = 120) -> str:
    """A URL cut for messages (data: URLs of inline images are long)."""
    return url if len(url) <= limit else url[:limit] + "..."


def _state_problems(state: dict) -> list[str]:
    """Problems visible in the DOM once the page settled."""
    problems = []
    for n, w in enumerate(state["widgets"], 1):
        if w["error"]:
            problems.append(f"widget {n} rendered a JavaScript error view")
        elif not w["rendered"]:
            problems.append(f"widget {n} did not render")
        elif w["areas"] > 1:
            problems.append(f"widget {n} rendered {w['areas']} times")
    for img in state["images"]:
        if img["complete"] and img["natural"] == 0:
            problems.append(f"image {_short(img['src'])} did not load (naturalWidth 0)")
        elif not img["complete"]:
            problems.append(f"image {_short(img['src'])} never finished loading")
        elif img["visible"] and (img["width"] == 0 or img["height"] == 0):
            problems.append(f"image {_short(img['src'])} is rendered with zero size "
                            f"({img['width']:g}x{img['height']:g})")
    for table in state.get("wideTables", []):
        if table["width"] > state["column"] + 1:
            problems.append(f"a table is {table['width']} px wide, wider than the text column ({state['column']} px)")
        else:
            problems.append(f"a table scrolls sideways in a box {table['box']} px wide")
    for text in state.get("rawTables", []):
        problems.append(f"a Markdown table shows as text, not as a table: {text!r}")
    if state["math"]:
        if not state["mathJax"]:
            problems.append(f"{state['math']} math element(s) but MathJax did not load")
        elif state["untypeset"]:
            problems.append(f"MathJax did not typeset {state['untypeset']} of "
                            f"{state['math']} math element(s)")
    for err in state["mathErrors"]:
        problems.append(f"MathJax error: {err}")
    return problems


def _settled(state: dict) -> bool:
    """True when nothing on the page is still expected to change."""
    if state["ready"] != "complete":
        return False
    if state["widgetManager"] and any(not (w["rendered"] or w["error"]) for w in state["widgets"]):
        return False
    if any(not img["complete"] for img in state["images"]):
        return False
    if state["math"] and state["mathJax"] and not state["mathDone"]:
        return False
    return True


def _check_one(browser: _Browser, url: str, timeout: float, settle: float) -> tuple[list[str], dict]:
    """Open ``url`` in a new tab, wait for it to settle, and list its problems."""
    target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.call("Target.attachToTarget",
                           {"targetId": target, "flatten": True})["sessionId"]
    log = _PageLog()
    try:
        for domain in ("Page", "Network", "Runtime", "Log"):
            browser.call(f"{domain}.enable", session=session)
        browser.backlog.clear()  # about:blank noise from before the enables
        start = time.monotonic()
        deadline = start + timeout
        nav = browser.call("Page.navigate", {"url": url}, session=session)
        if nav.get("errorText"):
            return [f"cannot open {url}: {nav['errorText']}"], {}

        def pump(until: float, stop_at_load: bool = False) -> None:
            """Record this tab's events until ``until`` (or its load event)."""
            while not (stop_at_load and log.loaded):
                ev = browser.event(until)
                if ev is None:
                    return
                if ev.get("sessionId") == session:
                    log.add(ev)

        pump(deadline, stop_at_load=True)
        if not log.loaded:
            return log.problems + [f"no load event within {timeout:g} s"], {}
        def page_state() -> dict | None:
            """The DOM state, or None while a navigation (a redirect) replaces the document."""
            try:
                reply = browser.call("Runtime.evaluate",
                                     {"expression": PAGE_STATE_JS, "returnByValue": True},
                                     session=session)
                return json.loads(reply["result"]["value"])
            except (RuntimeError, KeyError, TypeError, ValueError):
                return None

        settle_by = min(deadline, time.monotonic() + settle)
        confirmed = False
        while True:
            state = page_state()
            settled = state is not None and _settled(state)
            if (settled and confirmed) or time.monotonic() >= settle_by:
                break
            # Once settled, look again after a pause: late console errors arrive,
            # and a meta-refresh redirect starts only after the load event.
            confirmed = settled
            pump(min(settle_by, time.monotonic() + (0.3 if settled else 0.1)))
        if state is None:
            return log.problems + ["the page kept navigating; no stable document to inspect"], {}
        state["requests"] = log.requests
        state["seconds"] = time.monotonic() - start
        return log.problems + _state_problems(state), state
    finally:
        try:
            browser.call("Target.closeTarget", {"targetId": target}, timeout=5)
        except (RuntimeError, TimeoutError):
            pass


def inspect_pages(html_dir: Path, pages: list[str], *, timeout: float = 30,
                  settle: float = SETTLE, ignore=KNOWN_HARMLESS) -> dict[str, tuple[list[str], dict]]:
    """Like ``check_pages``, also returning each page's raw state: every requested
    URL (``requests``), widgets, images, math counts and ``seconds`` taken."""
    exe = find_chromium()
    if exe is None:
        raise RuntimeError(f"Chromium was not found; {INSTALL_HINT}")
    html_dir = Path(html_dir).resolve()
    results: dict[str, tuple[list[str], dict]] = {}
    with tempfile.TemporaryDirectory(prefix="hnd-chromium-") as profile:
        browser = _Browser(exe, profile, timeout)
        try:
            try:
                browser.call("Browser.getVersion", timeout=timeout)
            except (RuntimeError, TimeoutError) as exc:
                raise RuntimeError(f"Chromium ({exe}) did not answer on the DevTools pipe: "
                                   f"{exc}; {INSTALL_HINT}") from exc
            for page in pages:
                path = html_dir / page
                if not path.is_file():
                    results[page] = ([f"page {path} does not exist"], {})
                    continue
                try:
                    problems, state = _check_one(browser, path.as_uri(), timeout, settle)
                except TimeoutError as exc:
                    problems, state = [f"browser timed out: {exc}"], {}
                results[page] = ([m for m in problems
                                  if not any(re.search(rx, m) for rx, _ in ignore)], state)
        finally:
            browser.close()
    return results


def check_pages(html_dir: Path, pages: list[str], *, timeout: float = 30,
                ignore=KNOWN_HARMLESS) -> dict[str, list[str]]:
    """Open each page (relative to ``html_dir``) in headless Chromium and return,
    per page, a list of human-readable problems; an empty list means the page is fine.

    Problems: failed or non-local requests, console errors and uncaught exceptions,
    images that did not load or have zero size, saved widgets that did not render,
    tables wider than the text column, Markdown tables shown as text (a ``|---|``
    line outside code) and math that MathJax did not typeset.  Problems matching a pattern of
    ``ignore`` (default ``KNOWN_HARMLESS``: pairs of regular expression and
    reason) are left out.  Raises RuntimeError when Chromium is missing or
    cannot start.
    """
    return {page: problems for page, (problems, _) in
            inspect_pages(html_dir, pages, timeout=timeout, ignore=ignore).items()}


class LivePage:
    """One tab of a running web app: run JavaScript in it, wait for what it shows, and
    collect what went wrong meanwhile (``problems``: as :func:`check_pages` reports them)."""

    def __init__(self, browser: _Browser, session: str, log: _PageLog):
        self.browser, self.session, self.log = browser, session, log

    @property
    def problems(self) -> list[str]:
        self.pump(0)
        return list(self.log.problems)

    @property
    def requests(self) -> list[str]:
        self.pump(0)
        return list(self.log.requests)

    def pump(self, seconds: float) -> None:
        """Record this tab's events for ``seconds`` (0: those already received)."""
        until = time.monotonic() + max(seconds, 0.005)
        while (ev := self.browser.event(until)) is not None:
            if ev.get("sessionId") == self.session:
                self.log.add(ev)

    def evaluate(self, expression: str, *, timeout: float = 30):
        """The JSON value of ``expression`` in the page (a promise is awaited)."""
        reply = self.browser.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                       "awaitPromise": True, "timeout": timeout * 1000},
                                  session=self.session, timeout=timeout + 5)
        self.pump(0)
        if "exceptionDetails" in reply:
            d = reply["exceptionDetails"]
            raise RuntimeError(d.get("exception", {}).get("description") or d.get("text", "script failed"))
        return reply["result"].get("value")

    def wait_for(self, expression: str, *, timeout: float = 60, poll: float = 0.1):
        """The first truthy value of ``expression``, evaluated every ``poll`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the page never satisfied {expression[:80]!r} within {timeout:g} s")
            self.pump(poll)


@contextlib.contextmanager
def open_app(url: str, *, timeout: float = 60, local: tuple[str, ...] = ()):
    """Open ``url`` (a web app on this machine) in headless Chromium and yield a
    :class:`LivePage`; ``local``: URL prefixes besides the usual local schemes that the page
    may load from (its own origin, its websocket)."""
    exe = find_chromium()
    if exe is None:
        raise RuntimeError(f"Chromium was not found; {INSTALL_HINT}")
    with tempfile.TemporaryDirectory(prefix="hnd-chromium-") as profile:
        browser = _Browser(exe, profile, timeout)
        try:
            browser.call("Browser.getVersion", timeout=timeout)
            target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            log = _PageLog(LOCAL_SCHEMES + tuple(local))
            for domain in ("Page", "Network", "Runtime", "Log"):
                browser.call(f"{domain}.enable", session=session)
            browser.backlog.clear()
            nav = browser.call("Page.navigate", {"url": url}, session=session)
            if nav.get("errorText"):
                raise RuntimeError(f"cannot open {url}: {nav['errorText']}")
            page = LivePage(browser, session, log)
            deadline = time.monotonic() + timeout
            while not log.loaded and time.monotonic() < deadline:
                page.pump(0.1)
            if not log.loaded:
                raise TimeoutError(f"no load event from {url} within {timeout:g} s")
            yield page
        finally:
            browser.close()
