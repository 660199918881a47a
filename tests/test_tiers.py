"""Each test belongs to one tier, from its folder: `scripts/test.sh --fast` runs the unit tier (`-m unit`),
`scripts/test.sh` all three."""

from __future__ import annotations

import pytest

from tests.conftest import TESTS, tier


def test_a_tests_tier_is_its_folders() -> None:
    assert tier(TESTS / "e2e" / "test_e2e_chat.py") == "e2e"
    assert tier(TESTS / "packaging" / "test_image.py") == "packaging"
    others = [p for p in TESTS.rglob("test_*.py") if p.relative_to(TESTS).parts[0] not in ("e2e", "packaging")]
    assert others and {tier(p) for p in others} == {"unit"}


def test_collected_tests_carry_their_tiers_marker(request: pytest.FixtureRequest) -> None:
    assert [m.name for m in request.node.iter_markers() if m.name in ("unit", "e2e", "packaging")] == ["unit"]
