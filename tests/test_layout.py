"""The house stays laid out by concept: no application module grows past 400 lines, and the
chat app stays well under 4,000 (issue 13). Counted like `wc -l`, migrations apart."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APPS = ("billing", "compat", "config", "conversations", "llm", "moderation", "simulator", "tenants", "tools")
MODULE_LIMIT = 400
CONVERSATIONS_LIMIT = 4000


def _modules(app: str) -> list[Path]:
    return [path for path in (ROOT / app).rglob("*.py") if "migrations" not in path.parts]


def _lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def test_no_application_module_is_over_400_lines():
    over = {str(path.relative_to(ROOT)): _lines(path) for app in APPS for path in _modules(app)}
    over = {name: lines for name, lines in over.items() if lines > MODULE_LIMIT}
    assert not over, f"split these by concept: {over}"


def test_the_chat_app_stays_well_under_4000_lines():
    total = sum(_lines(path) for path in _modules("conversations"))
    assert total < CONVERSATIONS_LIMIT, total


def test_every_app_named_here_exists():
    # A renamed app would make the checks above pass vacuously.
    assert all((ROOT / app / "__init__.py").exists() for app in APPS)
