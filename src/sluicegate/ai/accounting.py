"""What one AI request cost and how it went: filled in while the request is served, read
by the ai-proxy `log` hook (Prometheus series) and the access log (`ai` field)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sluicegate.ai.adapter import Usage
from sluicegate.ai.tokens import estimate_tokens

# Payloads in access log entries (ai-proxy `logging.payloads`) are cut here: a log line
# per request must stay a line, not a copy of every prompt with its images.
MAX_LOGGED_PAYLOAD = 8 * 1024
# ctx.vars key of a pricer, (provider, model) -> (USD per 1M prompt tokens, per 1M
# completion tokens) or None: ai-budget puts it there before the AI plugin serves, so the
# record (and the access log, written before route plugins' log hooks) can say the cost.
AI_PRICER_VAR = "ai_pricer"
Pricer = Callable[[str, str], "tuple[float, float] | None"]


def _cut(text: str) -> str:
    return text if len(text) <= MAX_LOGGED_PAYLOAD else text[:MAX_LOGGED_PAYLOAD] + "..."


class AiRecord:
    """One AI request. `error` is None or the error type label (see metrics)."""

    __slots__ = ("api", "attempts", "completion_parts", "error", "finished", "instance",
                 "model", "pricer", "prompt_estimate", "provider", "request_payload",
                 "response_payload", "stream", "ttft", "usage")

    def __init__(self, provider: str, api: str) -> None:
        self.provider = provider
        self.api = api  # chat | embeddings | models, and the front: openai | anthropic
        self.model = ""
        self.stream = False
        self.usage: Usage | None = None
        self.ttft: float | None = None
        self.error: str | None = None
        self.finished = False  # False when the client left before the answer ended
        self.prompt_estimate = 0  # estimated prompt tokens, in case the provider says none
        self.completion_parts: list[str] = []  # streamed text, to estimate when needed
        self.request_payload: str | None = None  # logging.payloads only
        self.response_payload: str | None = None
        # ai-proxy-multi: the instance that answered, and the failed tries before it
        # ({"instance", "provider", "model", "error"} each).
        self.instance: str | None = None
        self.attempts: list[dict[str, str]] | None = None
        self.pricer: Pricer | None = None  # ai-budget's, see AI_PRICER_VAR

    def settle(self) -> None:
        """Called by each log hook that reads the record: a client that left before the
        answer ended is charged what the provider produced so far. Idempotent."""
        if not self.finished:
            self.finished = True
            self.error = self.error or "client_closed"
            if self.api.startswith("chat"):
                self.usage = self.estimate_usage()

    def estimate_usage(self) -> Usage:
        """Figures from the request and the text streamed so far."""
        completion = estimate_tokens("".join(self.completion_parts))
        return Usage(self.prompt_estimate, completion, estimated=True)

    def cost(self) -> float | None:
        """USD this request cost (from its usage and the pricer), None when unpriced."""
        usage = self.usage
        if self.pricer is None or usage is None:
            return None
        price = self.pricer(self.provider, self.model)
        if price is None:
            return None
        return (usage.prompt_tokens * price[0] + usage.completion_tokens * price[1]) / 1e6

    def log_fields(self) -> dict[str, Any]:
        usage = self.usage
        fields: dict[str, Any] = {
            "provider": self.provider, "api": self.api, "model": self.model,
            "stream": self.stream,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
            "total_tokens": usage.total_tokens if usage else None,
            "tokens_estimated": usage.estimated if usage else None,
            "ttft_ms": round(self.ttft * 1000, 3) if self.ttft is not None else None,
            "error": self.error,
        }
        if self.instance is not None:
            fields["instance"] = self.instance
        if self.attempts:
            fields["failed_attempts"] = self.attempts
        cost = self.cost()
        if cost is not None:
            fields["cost_usd"] = round(cost, 9)
        if self.request_payload is not None:
            fields["request"] = _cut(self.request_payload)
        if self.response_payload is not None:
            fields["response"] = _cut(self.response_payload)
        return fields
