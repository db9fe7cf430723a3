"""The OpenAI family: providers speaking OpenAI's chat completions API, whose wire format
is the gateway's internal form (openai, azure-openai, deepseek, mistral, ollama's /v1 API,
and openai-compatible servers: vLLM, groq, openrouter, ...). They differ only in the
default endpoint, in whether a stream reports usage without being asked, and in the
shapes of their error bodies."""

from __future__ import annotations

import json
from typing import Any

from sluicegate.ai.adapter import (
    MAX_ERROR_MESSAGE,
    AdapterError,
    JsonObject,
    ProviderRequest,
    ProviderTarget,
    StreamError,
    Usage,
    error_type_for,
    openai_error,
    plain_error_text,
    usage_from_openai,
)
from sluicegate.proto.sse import SseError, SseParser

ALL_KINDS = frozenset({"chat", "embeddings", "models"})


class OpenAIStream:
    """OpenAI SSE (`data: {chunk}` ... `data: [DONE]`) to chunk dicts."""

    __slots__ = ("done", "parser", "usage")

    def __init__(self) -> None:
        self.parser = SseParser()
        self.usage: Usage | None = None
        self.done = False

    def feed(self, data: bytes) -> list[JsonObject]:
        try:
            events = self.parser.feed(data)
        except SseError as exc:
            raise StreamError(openai_error(f"provider stream: {exc}", "api_error")) from None
        chunks = []
        for event in events:
            payload = event.data
            if payload == "[DONE]":
                self.done = True
                continue
            try:
                chunk = json.loads(payload)
            except ValueError:
                chunk = None
            if not isinstance(chunk, dict):
                raise StreamError(openai_error("provider sent a malformed stream event",
                                               "api_error"))
            if "error" in chunk:
                raise StreamError(error_object(chunk, 500))
            usage = chunk.get("usage")
            if usage:
                self.usage = usage_from_openai(usage)
            # Some servers end with the finish_reason chunk and no [DONE]: that is a
            # complete answer too (only a stream cut before it is not).
            for choice in chunk.get("choices") or ():
                if isinstance(choice, dict) and choice.get("finish_reason"):
                    self.done = True
            chunks.append(chunk)
        return chunks


def error_object(data: Any, status: int) -> JsonObject:
    """An OpenAI error object from the error shapes OpenAI-style servers send:
    `{"error": {...}}` (OpenAI, Azure, DeepSeek), `{"error": "text"}` (ollama),
    `{"object": "error", "message": ...}` (Mistral, vLLM), `{"detail": ...}` (FastAPI)."""
    default_type = error_type_for(status)
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):
            message = error.get("message")
            return openai_error(_text(message) if message is not None else "provider error",
                                _text(error.get("type") or default_type),
                                _param(error.get("param")), _code(error.get("code")))
        if isinstance(error, str):
            return openai_error(_text(error), default_type)
        message = data.get("message", data.get("detail"))
        if message is not None:
            return openai_error(_text(message), _text(data.get("type") or default_type),
                                _param(data.get("param")), _code(data.get("code")))
    return openai_error(_text(data) if data is not None else "provider error", default_type)


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:MAX_ERROR_MESSAGE]


def _param(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _code(value: Any) -> str | int | None:
    return value if isinstance(value, str | int) else None


class OpenAIFamily:
    """An OpenAI-compatible provider."""

    def __init__(self, name: str, default_endpoint: str | None, ask_stream_usage: bool = True,
                 kinds: frozenset[str] = ALL_KINDS) -> None:
        self.name = name
        self.default_endpoint = default_endpoint
        # Ask for usage on streams (stream_options.include_usage): OpenAI, Azure, DeepSeek
        # and ollama report it only when asked; Mistral reports it unasked.
        self.ask_stream_usage = ask_stream_usage
        self.kinds = kinds

    def chat_request(self, body: JsonObject, target: ProviderTarget) -> ProviderRequest:
        headers = {"Content-Type": "application/json", **target.headers}
        if body.get("stream"):
            headers["Accept"] = "text/event-stream"
            if self.ask_stream_usage:
                options = body.get("stream_options")
                options = dict(options) if isinstance(options, dict) else {}
                options["include_usage"] = True
                body = {**body, "stream_options": options}
        return ProviderRequest("POST", target.url("/chat/completions"), headers, body)

    def chat_response(self, data: JsonObject, created: int) -> JsonObject:
        return data

    def stream_translator(self, model: str, created: int) -> OpenAIStream:
        return OpenAIStream()

    def embeddings_request(self, body: JsonObject, target: ProviderTarget) -> ProviderRequest:
        self._serves("embeddings")
        headers = {"Content-Type": "application/json", **target.headers}
        return ProviderRequest("POST", target.url("/embeddings"), headers, body)

    def embeddings_response(self, data: JsonObject) -> JsonObject:
        return data

    def models_request(self, target: ProviderTarget) -> ProviderRequest:
        self._serves("models")
        return ProviderRequest("GET", target.url("/models"), dict(target.headers))

    def models_response(self, data: JsonObject) -> JsonObject:
        return data

    def error(self, status: int, body: bytes) -> JsonObject:
        try:
            data = json.loads(body)
        except ValueError:
            return openai_error(plain_error_text(body), error_type_for(status))
        return error_object(data, status)

    def _serves(self, kind: str) -> None:
        if kind not in self.kinds:
            raise AdapterError(f"provider {self.name} has no {kind} API", status=404,
                               code="unsupported_api")


OPENAI = OpenAIFamily("openai", "https://api.openai.com/v1")
# Azure needs the deployment URL: override.endpoint such as
# https://NAME.openai.azure.com/openai/deployments/DEPLOYMENT?api-version=2024-10-21
AZURE_OPENAI = OpenAIFamily("azure-openai", None)
DEEPSEEK = OpenAIFamily("deepseek", "https://api.deepseek.com/v1",
                        kinds=frozenset({"chat", "models"}))
MISTRAL = OpenAIFamily("mistral", "https://api.mistral.ai/v1", ask_stream_usage=False)
OLLAMA = OpenAIFamily("ollama", "http://127.0.0.1:11434/v1")
OPENAI_COMPATIBLE = OpenAIFamily("openai-compatible", None)
