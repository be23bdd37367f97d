"""What both fakes are: a sandbox's state run in-process, the calls made, the effects, scripted answers."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from cancelflow_tools.sandboxes.common import Reply, run_action

Outcome = TypeVar("Outcome")


class SandboxFake(Generic[Outcome]):
    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        self.calls: list[dict[str, Any]] = []
        self.effects: list[dict[str, Any]] = []
        self._scripted: deque[Outcome] = deque()

    def _queue(self, *outcomes: Outcome) -> None:
        self._scripted.extend(outcomes)

    def _next_scripted(self) -> Outcome | None:
        return self._scripted.popleft() if self._scripted else None

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def _apply(self, action: Callable[[dict[str, Any], dict[str, Any]], Reply], body: dict[str, Any]) -> Reply:
        """Run the sandbox's rule on the fake's state, as the sandbox's HTTP handler would."""
        reply = run_action(action, self.state, body)
        self.effects.extend(reply.effects)
        return reply
