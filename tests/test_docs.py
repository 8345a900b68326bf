"""The documentation site builds in strict mode, offline, with reference pages that match the
code: a broken link, a page missing from the nav, or a stale reference fails here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jaxlm import cli
from jaxlm.config import describe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    # Any attempt to reach the network goes to a closed port and fails the build.
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", JAX_PLATFORMS="cpu")
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env[var] = "http://127.0.0.1:9"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def _text(html: str) -> str:
    return re.sub(r"<[^>]+>", "", html)


def test_every_config_key_is_in_the_reference(site):
    page = _text((site / "reference/config.html").read_text())
    keys, section = [], ""
    for line in describe().splitlines():
        if m := re.match(r"(\w+):  # ", line):
            section = m[1]
        elif m := re.match(r"  (\w+): ", line):
            keys.append(f"{section}.{m[1]}")
    assert len(keys) > 50
    for key in keys:
        assert key in page, f"{key} missing from reference/config"


def test_every_command_help_is_in_the_reference(site):
    page = _text((site / "reference/cli.html").read_text())
    start = _text((site / "index.html").read_text())
    for command in cli.commands():
        assert f"usage: jaxlm {command}" in page, f"jaxlm {command} missing from reference/cli"
        assert f"jaxlm {command}" in start, f"jaxlm {command} missing from the start page"


def test_api_reference_renders_docstrings(site):
    page = (site / "reference/api.html").read_text()
    assert "load_config" in page and "build_model" in page


def test_site_uses_no_remote_fonts_or_scripts(site):
    index = (site / "index.html").read_text()
    assert "fonts.googleapis" not in index
    assert not re.search(r'<script[^>]+src="https?://', index)


def test_readme_links_resolve(site):
    """README is read on GitHub, outside the site: its relative links and anchors must exist."""
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert "docs/img/site.png" in links
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        path, _, anchor = link.partition("#")
        assert (REPO / path).exists(), f"README links to missing {path}"
        if anchor:
            page = site / Path(path).relative_to("docs").with_suffix(".html")
            assert f'id="{anchor}"' in page.read_text(), f"README: no #{anchor} in {path}"


def test_readme_test_command_is_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    assert "bash run.sh test" in readme
    assert (REPO / ".ci/run").read_text().strip().endswith("bash run.sh test")
