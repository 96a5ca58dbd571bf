"""What a server process loads at start: packages it needs only now and then
(schema migrations, verifying a single sign-on) are imported when used, so that
every HTTP worker, DIMSE process and header helper stays smaller."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Imported where used: alembic by Database.migrate, joserfc (and cryptography)
# by the functions that verify an OpenID Connect sign-in. Every archive the
# tests open is migrated, and tests/test_oidc.py verifies ID tokens: both paths
# run in the suite.
LAZY = ("alembic", "joserfc", "cryptography")


def _loaded(module: str) -> set[str]:
    """Top-level packages in sys.modules after importing ``module`` in a fresh
    interpreter (this one has loaded everything the other tests needed)."""
    code = (f"import json, sys, {module}; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    return set(json.loads(done.stdout))


@pytest.mark.parametrize("module", ["lightbox.server", "lightbox.dimse.scp"])
def test_server_processes_leave_occasional_packages_unloaded(module: str) -> None:
    loaded = _loaded(module)
    assert "sqlalchemy" in loaded and "pydicom" in loaded  # the check itself works
    assert loaded.isdisjoint(LAZY), sorted(loaded & set(LAZY))


def test_the_header_helper_loads_no_index_nor_web_stack() -> None:
    loaded = _loaded("lightbox.services.readahead")
    assert "pydicom" in loaded
    assert loaded.isdisjoint({*LAZY, "sqlalchemy", "starlette", "uvicorn", "pynetdicom"})

