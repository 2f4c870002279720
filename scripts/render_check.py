"""Check that the built book renders offline and fits its width: MathJax typesets every page's equations, every
image loads, no script or stylesheet comes from the network, and at 1280 px nothing (code, output, table, display
equation) is wider than the page.

For developers (not run in CI). Needs the built HTML (``jupyter-book build .``) and a headless Chromium
(Debian: ``apt-get install chromium``). Every page is opened from ``file://`` with all host names made
unresolvable, so a page that needs the network (a CDN copy of MathJax, a remote image) fails the check.

    .venv/bin/python scripts/render_check.py                      # every page under _build/html/book
    .venv/bin/python scripts/render_check.py book/intro.html --screenshot-dir /tmp/vhmn-shots

For each page it prints how many equations MathJax rendered, how many images loaded, what overflows, and writes
a screenshot PNG of the whole page (look at it). Exit status 1 if any page fails.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--hide-scrollbars",
    "--allow-file-access-from-files",
    # offline: no host name resolves, so anything fetched from the network fails
    "--host-resolver-rules=MAP * ~NOTFOUND",
]

# Injected into a copy of the page: after load and after MathJax finished typesetting, write a JSON report
# into a <pre id="render-check"> element that --dump-dom then shows.
PROBE = """
<script>
(function () {
  document.querySelectorAll('img').forEach(function (i) { i.loading = 'eager'; });
  // What a reader at book width would have to scroll sideways to see: code, outputs, tables, display equations.
  function overflowing() {
    // the visible right edge of the text column: the narrowest of the theme's article containers
    var right = Infinity;
    ['main', 'article', '.bd-article', '.bd-article-container', '#main-content'].forEach(function (q) {
      document.querySelectorAll(q).forEach(function (c) { right = Math.min(right, c.getBoundingClientRect().right); });
    });
    if (right === Infinity) right = document.documentElement.clientWidth;
    var sel = 'div.highlight pre, div.cell_output pre, div.output pre, table, mjx-container[display="true"], div.math';
    var out = [];
    document.querySelectorAll(sel).forEach(function (e) {
      var r = e.getBoundingClientRect();
      var scrolls = e.scrollWidth > e.clientWidth + 2;            // a scroll bar of its own
      var spills = r.width > 0 && r.right > right + 2;             // past the column (clipped or off-page)
      var clipped = false;                                         // inside a container narrower than itself
      for (var p = e.parentElement; p && p !== document.body; p = p.parentElement) {
        if (p.scrollWidth > p.clientWidth + 2 && getComputedStyle(p).overflowX !== 'visible') { clipped = true; break; }
      }
      if (!(scrolls || spills || clipped)) return;
      var text = (e.textContent || '').replace(/\s+/g, ' ').trim().slice(0, 50);
      out.push(e.tagName.toLowerCase() + ' ' + Math.round(r.width) + 'px' + (scrolls ? ' scrolls' : '') +
               (spills ? ' spills' : '') + (clipped ? ' clipped' : '') + ': ' + text);
    });
    return out;
  }
  function report(extra) {
    var imgs = Array.prototype.slice.call(document.images);
    var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                  .map(function (i) { return i.getAttribute('src'); });
    var out = {
      images: imgs.length, images_failed: bad,
      mjx: document.querySelectorAll('mjx-container').length,
      mjx_errors: document.querySelectorAll('mjx-merror').length,
      mathjax: (window.MathJax && window.MathJax.version) || null,
      math_sources: document.querySelectorAll('.math, span.math, div.math').length,
      overflow: overflowing(),
      network_scripts: Array.prototype.slice.call(document.querySelectorAll('script[src], link[rel="stylesheet"][href]'))
        .map(function (e) { return e.getAttribute('src') || e.getAttribute('href'); })
        .filter(function (u) { return /^(https?:)?\/\//.test(u); }),
      height: document.documentElement.scrollHeight,
      note: extra || ''
    };
    var pre = document.createElement('pre');
    pre.id = 'render-check';
    pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  }
  window.addEventListener('load', function () {
    var mj = window.MathJax;
    if (mj && mj.startup && mj.startup.promise) {
      mj.startup.promise.then(function () { report('typeset'); }, function (e) { report('mathjax error: ' + e); });
    } else {
      setTimeout(function () { report('no MathJax'); }, 3000);
    }
  });
})();
</script>
"""


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("render_check: no Chromium found. Install it (Debian: `apt-get install chromium`) and retry.")


def run_chromium(chromium: str, args: list[str], timeout: float = 90.0) -> str:
    with tempfile.TemporaryDirectory(prefix="vhmn-chromium-") as profile:
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return proc.stdout


def check_page(chromium: str, page: Path, shot_dir: Path) -> tuple[bool, str]:
    html = page.read_text(encoding="utf-8")
    if "</body>" not in html:
        return False, "no </body> in page"
    probe_page = page.with_name(page.stem + ".__render_check__.html")
    probe_page.write_text(html.replace("</body>", PROBE + "</body>", 1), encoding="utf-8")
    try:
        dom = run_chromium(
            chromium,
            ["--virtual-time-budget=20000", "--window-size=1280,4000", "--dump-dom", probe_page.as_uri()],
        )
    finally:
        probe_page.unlink(missing_ok=True)
    m = re.search(r'<pre id="render-check"[^>]*>(.*?)</pre>', dom, re.S)
    if not m:
        return False, "the probe never reported (page did not finish loading)"
    rep = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))

    shot = shot_dir / (str(page.relative_to(page.parents[1])).replace("/", "_").replace(".html", ".png"))
    height = max(800, min(int(rep.get("height") or 1600), 60000))  # the whole page, not its first screen
    run_chromium(chromium, ["--virtual-time-budget=20000", f"--window-size=1280,{height}", f"--screenshot={shot}", page.as_uri()])

    problems = []
    if rep["math_sources"] and not rep["mathjax"]:
        problems.append("MathJax did not load (is it served from a local copy?)")
    if rep["math_sources"] and rep["mjx"] == 0:
        problems.append(f"{rep['math_sources']} equations, none typeset")
    if rep["mjx_errors"]:
        problems.append(f"{rep['mjx_errors']} MathJax errors")
    if rep["images_failed"]:
        problems.append(f"images failed to load: {rep['images_failed']}")
    if rep["overflow"]:
        problems.append(f"{len(rep['overflow'])} element(s) wider than the page at 1280 px: " + " | ".join(rep["overflow"][:5]))
    if rep["network_scripts"]:
        problems.append(f"loads from the network: {rep['network_scripts']}")
    summary = (
        f"equations {rep['math_sources']:3d} typeset {rep['mjx']:3d} | images {rep['images']:2d} "
        f"failed {len(rep['images_failed'])} | MathJax {rep['mathjax']} | screenshot {shot}"
    )
    return not problems, summary + ("" if not problems else " | " + "; ".join(problems))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pages", nargs="*", help="pages relative to the HTML folder (default: book/*.html)")
    ap.add_argument("--html-dir", default="_build/html", help="built HTML folder (default: _build/html)")
    ap.add_argument("--screenshot-dir", default="/tmp/vhmn-render-check", help="where screenshots go")
    args = ap.parse_args(argv)

    html_dir = Path(args.html_dir).resolve()
    if not html_dir.is_dir():
        sys.exit(f"render_check: {html_dir} does not exist; build the book first: jupyter-book build .")
    pages = [html_dir / p for p in args.pages] if args.pages else sorted((html_dir / "book").glob("*.html"))
    pages = [p for p in pages if not p.name.endswith(".__render_check__.html")]
    missing = [str(p) for p in pages if not p.is_file()]
    if missing:
        sys.exit(f"render_check: no such page(s): {missing}")
    if not pages:
        sys.exit(f"render_check: no pages found under {html_dir / 'book'}")
    shot_dir = Path(args.screenshot_dir)
    shot_dir.mkdir(parents=True, exist_ok=True)

    chromium = find_chromium()
    failed = 0
    for page in pages:
        ok, summary = check_page(chromium, page, shot_dir)
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {page.relative_to(html_dir)}: {summary}")
    print(f"{len(pages) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
