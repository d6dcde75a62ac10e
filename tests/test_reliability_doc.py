"""docs/reliability.md is generated from the test matrices and must not drift from them."""

from __future__ import annotations

from reliability_doc import DOC, render


def test_reliability_doc_matches_the_matrices() -> None:
    assert DOC.read_text() == render(), (
        "docs/reliability.md is out of date: run .venv/bin/python tests/reliability_doc.py"
    )
