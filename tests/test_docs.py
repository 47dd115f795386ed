"""The documentation site: ``mkdocs build --strict`` succeeds (a broken link, a missing page or a reference that
cannot be generated fails it), the generated reference of ``study.launch`` lists exactly the options of its parser,
and headless Chromium renders the index and the launcher's page the way a reader sees them."""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHOTS = "docs-screenshots"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built strictly into a temporary folder, as ``make docs-build`` builds it."""
    out = tmp_path_factory.mktemp("site")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the launcher's --address default reads it
    env.update(NO_MKDOCS_2_WARNING="1", DISABLE_MKDOCS_2_WARNING="true")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env=env)
    seconds = time.monotonic() - start
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    print(f"\nmkdocs build --strict: {seconds:.1f} s into {out}")
    return out


def _text(fragment: str) -> str:
    """What a reader reads in an HTML fragment: tags dropped, entities decoded, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", fragment)).split())


def _rows(page: str) -> list[list[str]]:
    """The text of each cell of each table row of an HTML page."""
    return [[_text(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, flags=re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", page, flags=re.S)]


def _launch_parser():
    from study.launch import build_parser

    return build_parser()


def test_the_site_builds_strictly_with_every_section(site: Path) -> None:
    for page in ("index.html", "getting-started/index.html", "reference/cli/launch/index.html",
                 "reference/registries/index.html", "reference/report-json/index.html", "results/index.html",
                 "changelog/index.html", "reference/api/study/launch/index.html",
                 "explanation/statistics/index.html"):
        assert (site / page).is_file(), page


def test_the_cli_reference_lists_every_option_of_the_launcher(site: Path) -> None:
    import argparse

    parser = _launch_parser()
    expected = {", ".join(a.option_strings) for a in parser._actions
                if a.option_strings and not isinstance(a, argparse._HelpAction)}
    page = (site / "reference" / "cli" / "launch" / "index.html").read_text()
    listed = {row[0] for row in _rows(page) if row and row[0].startswith("-")}
    assert listed == expected, (sorted(expected - listed), sorted(listed - expected))
    for action in parser._actions:  # each row carries the option's own help
        if action.help and action.option_strings and not isinstance(action, argparse._HelpAction):
            row = next(r for r in _rows(page) if r and r[0] == ", ".join(action.option_strings))
            first_words = " ".join(action.help.replace("%%", "%").split()[:4])
            assert first_words in row[-1], (action.option_strings, row)


def test_every_command_and_registry_is_in_the_reference(site: Path) -> None:
    from trainables.backbones import BACKBONES
    from trainables.finetune import STRATEGIES
    from trainables.pretrain import PRETRAIN_METHODS

    commands = {p.name for p in (site / "reference" / "cli").iterdir() if p.is_dir()}
    assert {"launch", "report", "predict", "cohort", "roi_preview"} <= commands
    text = _text((site / "reference" / "registries" / "index.html").read_text())
    for name in [*PRETRAIN_METHODS.names(), *STRATEGIES.names(), *BACKBONES.names()]:
        assert name in text, name


def _browser(exe: str, *args: str, profile: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--hide-scrollbars",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}"]
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=120)


def _render(chromium: str, page: Path, shot: Path, tmp: Path, size: str) -> str:
    """The page's DOM after its scripts ran, and a screenshot of it (``shot``, a PNG that is not blank)."""
    import matplotlib.image

    proc = _browser(chromium, "--virtual-time-budget=10000", "--dump-dom", page.as_uri(), profile=tmp / "dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    _browser(chromium, f"--window-size={size}", f"--screenshot={shot}", page.as_uri(), profile=tmp / "shot")
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] > 100 and float(pixels.std()) > 0.05, shot  # something is drawn
    return proc.stdout


def test_chromium_shows_the_two_commands_on_the_index(site, chromium, tmp_path_factory) -> None:
    shots = tmp_path_factory.mktemp(SHOTS)
    dom = _render(chromium, site / "index.html", shots / "index.png", shots, "1280,1000")
    article = dom[dom.index("<article"):dom.index("</article>")]
    text = _text(article)
    assert "make study" in text and "make test" in text, text[:1000]
    assert "Getting started" in _text(dom)  # the navigation is drawn
    print(f"\nscreenshot: {shots / 'index.png'}")


def test_chromium_shows_an_option_row_on_the_launchers_page(site, chromium, tmp_path_factory) -> None:
    shots = tmp_path_factory.mktemp(SHOTS)
    dom = _render(chromium, site / "reference" / "cli" / "launch" / "index.html", shots / "launch.png", shots,
                  "1280,3000")
    action = next(a for a in _launch_parser()._actions if "--race-budget" in a.option_strings)
    row = next((r for r in _rows(dom) if r and r[0] == "--race-budget"), None)
    assert row is not None, "no --race-budget row in the rendered launcher page"
    assert row[1] == action.metavar and " ".join(action.help.split()[:3]) in row[-1], row
    print(f"\nscreenshot: {shots / 'launch.png'}")
