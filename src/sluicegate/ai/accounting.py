"""What one AI request cost and how it went: filled in while the request is served, read
by the ai-proxy `log` hook (Prometheus series) and the access log (`ai` field)."""

from __future__ import annotations

from typing import Any

from sluicegate.ai.adapter import Usage
from sluicegate.ai.tokens import estimate_tokens

# Payloads in access log entries (ai-proxy `logging.payloads`) are cut here: a log line
# per request must stay a line, not a copy of every prompt with its images.
MAX_LOGGED_PAYLOAD = 8 * 1024


def _cut(text: str) -> str:
    return text if len(text) <= MAX_LOGGED_PAYLOAD else text[:MAX_LOGGED_PAYLOAD] + "..."


class AiRecord:
    """One AI request. `error` is None or the error type label (see metrics)."""

    __slots__ = ("api", "completion_parts", "error", "finished", "model", "prompt_estimate",
                 "provider", "request_payload", "response_payload", "stream", "ttft", "usage")

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

    def estimate_usage(self) -> Usage:
        """Figures from the request and the text streamed so far."""
        completion = estimate_tokens("".join(self.completion_parts))
        return Usage(self.prompt_estimate, completion, estimated=True)

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
        if self.request_payload is not None:
            fields["request"] = _cut(self.request_payload)
        if self.response_payload is not None:
            fields["response"] = _cut(self.response_payload)
        return fields
