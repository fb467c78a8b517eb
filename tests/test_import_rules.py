"""The shape holds: import-linter's contracts (layers, no cycles) pass, and they would catch a cycle."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("config", "compat", "conversations", "moderation", "tools", "billing", "llm", "streaming", "tenants", "simulator")


def _lint_imports() -> subprocess.CompletedProcess:
    executable = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    return subprocess.run([executable, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_import_contracts_are_kept():
    result = _lint_imports()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("billing.caps", "billing.tasks"),  # the alert outbox: the core never reaches its task
        ("billing.alerts", "billing.tasks"),
        ("tools.models", "tools.registry"),  # built-in names are handed down in ready()
        ("conversations.shutdown", "conversations.engine"),  # users register with shutdown
        ("conversations.shutdown", "compat.openai_api"),
        ("conversations.summaries", "conversations.services"),  # provider_target moved down
        ("conversations.summaries", "conversations.tasks"),  # the task is registered in ready()
        ("conversations.services", "conversations.turns"),  # the claim knows no turn
    ],
)
def test_no_core_module_imports_back_up(importer, imported):
    graph = grimp.build_graph(*PACKAGES)
    assert not graph.chain_exists(importer=importer, imported=imported), graph.find_shortest_chain(
        importer=importer, imported=imported
    )
