"""Stock `configuration.content`: the launcher serves a static folder at / next to its API."""

from __future__ import annotations

from pathlib import Path

import requests

from tests.conftest import LauncherFactory


def test_content_folder_is_served_beside_the_api(launcher: LauncherFactory, tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("<html data-app-name='demo'>hello</html>")
    probe = launcher(configuration={"content": str(www)})

    first = requests.get(f"{probe.base}/?sessionManagerURL=x", allow_redirects=False, timeout=10)
    assert first.status_code == 302
    assert first.headers["Location"].endswith("index.html?sessionManagerURL=x")
    page = requests.get(f"{probe.base}/index.html", timeout=10)
    assert page.status_code == 200 and "hello" in page.text
    missing = requests.get(f"{probe.base}/nope.js", timeout=10)
    assert missing.status_code == 404 and "error" in missing.json()
    # the API still wins over the catch-all static route
    assert requests.get(f"{probe.endpoint}/", timeout=10).json() == {"sessions": []}
