"""``python -m icd.models.serve``: the local OpenAI-compatible server a user can run."""

from __future__ import annotations

import pytest

from icd.models.serve import main


def test_serve_command_documents_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "OpenAI-compatible" in out and "--port" in out and "--api-key" in out
    assert "--max-body-mb" in out and "--device" in out
