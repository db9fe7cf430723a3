"""Anthropic's Messages API (`POST /v1/messages`, `GET /v1/models`) as a provider: OpenAI
chat requests to Messages requests, and Messages answers, errors and SSE streams
(message_start, content_block_start/delta/stop, message_delta, message_stop, ping, error)
back to OpenAI's shapes."""

from __future__ import annotations

import contextlib
import json
from datetime import datetime
from typing import Any

from sluicegate.ai.adapter import (
    AdapterError,
    JsonObject,
    ProviderRequest,
    ProviderTarget,
    StreamError,
    Usage,
    chunk_template,
    error_type_for,
    json_events,
    openai_error,
    plain_error_text,
)
from sluicegate.proto.sse import SseParser

# The API version header every request needs (the current and only stable version).
ANTHROPIC_VERSION = "2023-06-01"
# Anthropic requires max_tokens; OpenAI requests often leave it out. 4096 is the largest
# output every current Claude model accepts.
DEFAULT_MAX_TOKENS = 4096

# Messages stop_reason -> OpenAI finish_reason
FINISH_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                  "tool_use": "tool_calls", "pause_turn": "stop", "refusal": "content_filter"}


def _fail(message: str, param: str) -> AdapterError:
    return AdapterError(message, param=param)


def _image_block(url: Any, param: str) -> JsonObject:
    if not isinstance(url, str) or not url:
        raise _fail("image_url.url must be a non-empty string", param)
    if url.startswith("data:"):
        header, comma, data = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        if not comma or encoding != "base64":
            raise _fail("an image data URL must be base64 (data:TYPE;base64,...)", param)
        return {"type": "image", "source": {"type": "base64", "media_type": media_type,
                                            "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _content_blocks(content: Any, param: str) -> list[JsonObject]:
    """OpenAI message content (string or parts) to Messages content blocks."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise _fail("content must be a string or a list of parts", param)
    blocks = []
    for index, part in enumerate(content):
        where = f"{param}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise _fail("a text part needs a string text", f"{where}.text")
            if text:
                blocks.append({"type": "text", "text": text})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            blocks.append(_image_block(url, f"{where}.image_url"))
        else:
            raise _fail(f"content part type {kind!r} is not supported by anthropic",
                        f"{where}.type")
    return blocks


def _text_of(content: Any, param: str) -> str:
    return "\n".join(block["text"] for block in _content_blocks(content, param)
                     if block["type"] == "text")


def _tool(tool: Any, param: str) -> JsonObject:
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise _fail("a tool needs function.name", param)
    result: JsonObject = {"name": function["name"],
                          "input_schema": function.get("parameters") or
                          {"type": "object", "properties": {}}}
    if function.get("description"):
        result["description"] = function["description"]
    return result


def _tool_choice(choice: Any) -> JsonObject | None:
    if choice is None or choice == "auto":
        return {"type": "auto"}
    if choice == "required":
        return {"type": "any"}
    if choice == "none":
        return {"type": "none"}
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if isinstance(name, str):
            return {"type": "tool", "name": name}
    raise _fail("tool_choice must be auto, required, none or a function", "tool_choice")


def to_messages_request(body: JsonObject) -> JsonObject:
    """An OpenAI chat completions request as a Messages request."""
    system: list[str] = []
    messages: list[JsonObject] = []
    for index, message in enumerate(body["messages"]):
        role = message["role"]
        param = f"messages[{index}].content"
        content = message.get("content")
        if role in ("system", "developer"):
            system.append(_text_of(content, param))
        elif role == "user":
            messages.append({"role": "user", "content": _content_blocks(content, param)})
        elif role == "assistant":
            blocks = _content_blocks(content, param)
            for call_index, call in enumerate(message.get("tool_calls") or ()):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict):
                    raise _fail("a tool call needs a function",
                                f"messages[{index}].tool_calls[{call_index}]")
                try:
                    arguments = json.loads(function.get("arguments") or "{}")
                except ValueError:
                    raise _fail("tool call arguments must be JSON", f"messages[{index}]."
                                f"tool_calls[{call_index}].function.arguments") from None
                blocks.append({"type": "tool_use", "id": call.get("id"),
                               "name": function.get("name"), "input": arguments})
            messages.append({"role": "assistant", "content": blocks})
        elif role == "tool":
            messages.append({"role": "user", "content": [{
                "type": "tool_result", "tool_use_id": message.get("tool_call_id"),
                "content": _text_of(content, param)}]})
        else:
            raise _fail(f"role {role!r} is not supported by anthropic",
                        f"messages[{index}].role")
    request: JsonObject = {
        "model": body.get("model"),
        "messages": messages,
        "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens") or
        DEFAULT_MAX_TOKENS,
    }
    if system:
        request["system"] = "\n\n".join(system)
    for name in ("temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            request[name] = body[name]
    stop = body.get("stop")
    if stop:
        request["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("n") not in (None, 1):
        raise _fail("anthropic answers with one choice (n=1)", "n")
    tools = body.get("tools")
    if tools:
        request["tools"] = [_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
        choice = _tool_choice(body.get("tool_choice"))
        if body.get("parallel_tool_calls") is False and choice is not None:
            choice["disable_parallel_tool_use"] = True
        request["tool_choice"] = choice
    if isinstance(body.get("user"), str):
        request["metadata"] = {"user_id": body["user"]}
    if body.get("stream"):
        request["stream"] = True
    return request


def usage_of(usage: Any) -> Usage | None:
    """Messages usage: cache reads and writes are prompt tokens too (OpenAI's
    prompt_tokens includes cached ones)."""
    if not isinstance(usage, dict) or not isinstance(usage.get("input_tokens"), int):
        return None
    prompt = usage["input_tokens"] + (usage.get("cache_creation_input_tokens") or 0) + \
        (usage.get("cache_read_input_tokens") or 0)
    output = usage.get("output_tokens")
    return Usage(prompt, output if isinstance(output, int) else 0)


def error_object(status: int, body: bytes) -> JsonObject:
    """`{"type": "error", "error": {"type", "message"}}` to an OpenAI error object."""
    try:
        data = json.loads(body)
    except ValueError:
        return openai_error(plain_error_text(body), error_type_for(status))
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return openai_error(error["message"][:2000], str(error.get("type") or
                                                         error_type_for(status)))
    return openai_error(plain_error_text(body), error_type_for(status))


class AnthropicStream:
    """Messages SSE events to OpenAI chunk dicts."""

    __slots__ = ("created", "done", "id", "input_usage", "model", "parser", "tool_index",
                 "tool_slots", "usage")

    def __init__(self, model: str, created: int) -> None:
        self.parser = SseParser()
        self.model = model
        self.created = created
        self.id = ""
        self.usage: Usage | None = None
        self.input_usage: Usage | None = None
        self.done = False
        # content block index -> OpenAI tool_calls index
        self.tool_slots: dict[int, int] = {}
        self.tool_index = 0

    def _chunk(self, delta: JsonObject, finish_reason: str | None = None) -> JsonObject:
        chunk = chunk_template(self.id, self.model, self.created)
        chunk["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
        return chunk

    def feed(self, data: bytes) -> list[JsonObject]:
        chunks: list[JsonObject] = []
        for event, payload in json_events(self.parser, data):
            kind = payload.get("type", event.event)
            if kind == "content_block_delta":
                delta = payload.get("delta") or {}
                delta_type = delta.get("type")
                if delta_type == "text_delta":
                    chunks.append(self._chunk({"content": delta.get("text", "")}))
                elif delta_type == "input_json_delta":
                    slot = self.tool_slots.get(payload.get("index", -1))
                    if slot is not None:
                        chunks.append(self._chunk({"tool_calls": [{
                            "index": slot,
                            "function": {"arguments": delta.get("partial_json", "")}}]}))
                # thinking and signature deltas have no OpenAI chunk form: dropped
            elif kind == "message_start":
                message = payload.get("message") or {}
                self.id = message.get("id") or ""
                self.model = message.get("model") or self.model
                self.input_usage = usage_of(message.get("usage"))
                chunks.append(self._chunk({"role": "assistant", "content": ""}))
            elif kind == "content_block_start":
                block = payload.get("content_block") or {}
                if block.get("type") == "tool_use":
                    slot = self.tool_slots[payload.get("index", -1)] = self.tool_index
                    self.tool_index += 1
                    chunks.append(self._chunk({"tool_calls": [{
                        "index": slot, "id": block.get("id"), "type": "function",
                        "function": {"name": block.get("name"), "arguments": ""}}]}))
                elif block.get("type") == "text" and block.get("text"):
                    chunks.append(self._chunk({"content": block["text"]}))
            elif kind == "message_delta":
                delta = payload.get("delta") or {}
                self._count(payload.get("usage"))
                reason = delta.get("stop_reason")
                if reason:
                    chunks.append(self._chunk({}, FINISH_REASONS.get(reason, "stop")))
            elif kind == "message_stop":
                self.done = True
                if self.usage is not None:
                    chunk = chunk_template(self.id, self.model, self.created)
                    chunk["choices"] = []
                    chunk["usage"] = self.usage.as_openai()
                    chunks.append(chunk)
            elif kind == "error":
                error = payload.get("error") or {}
                raise StreamError(openai_error(str(error.get("message") or "provider error"),
                                               str(error.get("type") or "api_error")))
            # ping, content_block_stop: nothing to say in OpenAI's form
        return chunks

    def _count(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        output = usage.get("output_tokens")
        base = self.input_usage or Usage()
        prompt = base.prompt_tokens
        # Newer API versions repeat the input figures in message_delta: take them if so.
        repeated = usage_of(usage)
        if repeated is not None:
            prompt = repeated.prompt_tokens
        self.usage = Usage(prompt, output if isinstance(output, int) else 0)


class AnthropicAdapter:
    name = "anthropic"
    default_endpoint = "https://api.anthropic.com/v1"
    kinds = frozenset({"chat", "models"})

    def _headers(self, target: ProviderTarget) -> dict[str, str]:
        return {"Content-Type": "application/json", "anthropic-version": ANTHROPIC_VERSION,
                **target.headers}

    def chat_request(self, body: JsonObject, target: ProviderTarget) -> ProviderRequest:
        headers = self._headers(target)
        if body.get("stream"):
            headers["Accept"] = "text/event-stream"
        return ProviderRequest("POST", target.url("/messages"), headers,
                               to_messages_request(body))

    def chat_response(self, data: JsonObject, created: int) -> JsonObject:
        text = []
        tool_calls = []
        for block in data.get("content") or ():
            if block.get("type") == "text":
                text.append(block.get("text", ""))
            elif block.get("type") == "tool_use":
                tool_calls.append({"id": block.get("id"), "type": "function", "function": {
                    "name": block.get("name"),
                    "arguments": json.dumps(block.get("input") or {})}})
        message: JsonObject = {"role": "assistant",
                               "content": "".join(text) if text or not tool_calls else None}
        if tool_calls:
            message["tool_calls"] = tool_calls
        result: JsonObject = {
            "id": data.get("id", ""), "object": "chat.completion", "created": created,
            "model": data.get("model", ""),
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": FINISH_REASONS.get(data.get("stop_reason") or "",
                                                             "stop")}],
        }
        usage = usage_of(data.get("usage"))
        if usage is not None:
            result["usage"] = usage.as_openai()
        return result

    def stream_translator(self, model: str, created: int) -> AnthropicStream:
        return AnthropicStream(model, created)

    def embeddings_request(self, body: JsonObject, target: ProviderTarget) -> ProviderRequest:
        raise AdapterError("provider anthropic has no embeddings API", status=404,
                           code="unsupported_api")

    def embeddings_response(self, data: JsonObject) -> JsonObject:
        raise AdapterError("provider anthropic has no embeddings API", status=404)

    def models_request(self, target: ProviderTarget) -> ProviderRequest:
        headers = self._headers(target)
        del headers["Content-Type"]
        return ProviderRequest("GET", target.url("/models"), headers)

    def models_response(self, data: JsonObject) -> JsonObject:
        models = []
        for model in data.get("data") or ():
            created = 0
            with contextlib.suppress(ValueError):  # a missing or odd date: 0, as OpenAI has
                created = int(datetime.fromisoformat(
                    str(model.get("created_at")).replace("Z", "+00:00")).timestamp())
            models.append({"id": model.get("id"), "object": "model", "created": created,
                           "owned_by": "anthropic"})
        return {"object": "list", "data": models}

    def error(self, status: int, body: bytes) -> JsonObject:
        return error_object(status, body)


ANTHROPIC = AnthropicAdapter()
