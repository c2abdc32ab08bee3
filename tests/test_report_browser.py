"""The study report in a real browser (slow): headless Chromium, Debian's `chromium` package,
renders report.html of a small study from a known law, and a tiny script added to a copy of the
page marks what the browser made of it: each image's decoded width (0 for a figure that is
missing), the share of its pixels drawn (less than all for a figure cut short), its width on
the page, and where it and each table sit. Where
Chromium is not installed the test skips, saying so."""

import shutil
import subprocess

import pandas as pd
import pytest
from report_helpers import PageParts, check_report_page
from test_demo import held_out_budget, synthetic_points

from analysis.report import analyse_study
from analysis.report_page import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium): the "
    "report was not rendered in a browser")]

MARK = """<script>addEventListener('load', () => {
  for (const el of document.images) {
    el.setAttribute('data-natural-width', el.naturalWidth);
    el.setAttribute('data-width', el.width);
    let drawn = 0;  // the share of the figure's pixels the browser could draw
    if (el.naturalWidth) {
      const canvas = document.createElement('canvas');
      canvas.width = el.naturalWidth;
      canvas.height = el.naturalHeight;
      const g = canvas.getContext('2d');
      g.drawImage(el, 0, 0);
      const px = g.getImageData(0, 0, canvas.width, canvas.height).data;
      for (let i = 3; i < px.length; i += 4) if (px[i]) drawn++;
      drawn /= canvas.width * canvas.height;
    }
    el.setAttribute('data-drawn', drawn.toFixed(4));
  }
  for (const el of [...document.images, ...document.querySelectorAll('table')])
    el.setAttribute('data-top', Math.round(el.getBoundingClientRect().top + scrollY));
  document.body.setAttribute('data-checked', 'yes');
});</script>"""


def rendered(page: str, path) -> PageParts:
    """The DOM Chromium holds once the page (with MARK added) has loaded."""
    path.write_text(page.replace("</body>", MARK + "</body>"))
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                           "--window-size=1200,900", "--virtual-time-budget=10000",
                           "--dump-dom", path.as_uri()],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'data-checked="yes"' in done.stdout, done.stdout[-2000:]
    return PageParts(done.stdout)


def broken_figures(dom: PageParts) -> list[str]:
    """The figures the browser could not show whole: no image at all (natural width 0), or
    one drawn only in part (a matplotlib PNG is opaque everywhere)."""
    return [img["alt"] for img in dom.images
            if int(img["data-natural-width"]) == 0 or float(img["data-drawn"]) < 0.99]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("browser-report")
    points = pd.concat([synthetic_points().assign(held_out=False, seed=0),
                        held_out_budget()[0]], ignore_index=True)
    result = analyse_study(points, out, bootstrap=0)
    write_report(out, result, compute={"flops_branched": 1, "flops_from_scratch": 2,
                                       "saving": 0.5}, commands={}, timing={}, title="browser")
    return out, result


def test_the_report_in_chromium_shows_every_figure_before_the_tables(report, tmp_path):
    out, result = report
    page = (out / "report.html").read_text()
    check_report_page(page, result["figures"], lead=("law.png", "heldout.png"))
    dom = rendered(page, tmp_path / "report.html")
    assert len(dom.images) == len(result["figures"]) >= 7
    assert broken_figures(dom) == []
    assert all(int(img["data-width"]) >= 300 for img in dom.images), dom.images
    # On the rendered page the law and the held-out budget come first, above every table.
    top = {img["alt"]: int(img["data-top"]) for img in dom.images}
    first_table = min(int(t["attrs"]["data-top"]) for t in dom.tables)
    assert top["law.png"] < first_table and top["heldout.png"] < first_table

    # The check sees a figure the browser cannot show: one image's data gone, or cut short
    # (its header still gives the width; a third of the picture is drawn).
    start = page.index("base64,", page.index("alt='heldout.png'")) + len("base64,")
    end = page.index("'", start)
    for keep in (0, (end - start) // 3 // 4 * 4):
        broken = page[:start + keep] + page[end:]
        assert broken_figures(rendered(broken, tmp_path / f"cut-{keep}.html")) == \
            ["heldout.png"], keep
