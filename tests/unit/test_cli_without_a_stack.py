"""`cancelflow status` and `cancelflow dispute` with no stack running: a clear line and exit 1, no traceback."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cancelflow_tools.cli import app
from cancelflow_tools.stack.broker import free_port


@pytest.mark.parametrize(("command", "service"), [("status", "status"), ("dispute", "dispute")])
def test_a_read_without_a_running_stack_says_so(command: str, service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", f"127.0.0.1:{free_port()}")  # nothing listens there
    result = CliRunner().invoke(app, [command, "some-request"], env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    assert f"the {service} service does not answer" in result.output
    assert "is `cancelflow up` running?" in result.output
    assert "Traceback" not in result.output
