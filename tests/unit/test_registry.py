"""The Comfy Registry's required fields in pyproject.toml (what `comfy node validate` reads), checked offline.
scripts/test.sh also runs comfy-cli's own `comfy node validate` when comfy-cli can be installed."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_has_what_the_registry_needs():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project, comfy = data["project"], data["tool"]["comfy"]
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]{0,99}", project["name"]), "registry names are lowercase, digits, dashes"
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]), "semantic version"
    assert project["description"].strip() and project["license"]
    assert project["urls"]["Repository"].startswith("https://")
    assert re.fullmatch(r"[a-z0-9-]+", comfy["PublisherId"])
    assert comfy["DisplayName"].strip()
    # Every requirement the pack lists must be installable from PyPI by name (no URLs, no local paths).
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.strip()
        assert not line or line.startswith("#") or re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+\s*([<>=!~]=?.*)?", line), line
