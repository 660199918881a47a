"""README stays true: its settings table lists exactly the settings the service reads."""

from __future__ import annotations

import re
from pathlib import Path

from falcon_service.config import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def test_settings_table_matches_settings() -> None:
    documented = set(re.findall(r"^\| `FALCON_([A-Z_]+)` \|", README.read_text(), flags=re.M))
    assert documented == {name.upper() for name in Settings.model_fields}


def test_readme_commands_exist() -> None:
    text = README.read_text()
    root = README.parent
    for script in re.findall(r"^(scripts/\w+\.sh)", text, flags=re.M):
        assert (root / script).is_file(), script
