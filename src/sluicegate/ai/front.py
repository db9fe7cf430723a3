"""The APIs clients call, in the gateway's internal (OpenAI) form or translated to it.

`OPENAI_FRONT` serves OpenAI's chat completions, embeddings and models APIs; requests are
the internal form already, answers go out as they are. `ANTHROPIC_FRONT` serves Anthropic's
Messages API (`POST /v1/messages`, and `GET /v1/models` asked with an `anthropic-version`
header): its requests are translated to OpenAI chat requests, and OpenAI answers, chunks and
errors back to Messages, so an Anthropic SDK client can use any provider. Pure functions.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sluicegate.ai.adapter import AdapterError, JsonObject, Usage
from sluicegate.proto.sse import encode_event

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _require(condition: bool, message: str, param: str) -> None:
    if not condition:
        raise AdapterError(message, param=param)


def check_chat_request(body: Any) -> None:
    """The shape every adapter relies on; a 400 naming the field otherwise."""
    _require(isinstance(body, dict), "the request body must be a JSON object", "body")
    messages = body.get("messages")
    _require(isinstance(messages, list) and bool(messages),
             "messages must be a non-empty array", "messages")
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        _require(isinstance(message, dict), "each message must be an object", where)
        role = message.get("role")
        _require(isinstance(role, str) and role in ROLES,
                 f"role must be one of {', '.join(sorted(ROLES))}", f"{where}.role")
        content = message.get("content")
        _require(content is None or isinstance(content, str | list),
                 "content must be a string, an array of parts or null", f"{where}.content")
    model = body.get("model")
    _require(model is None or (isinstance(model, str) and bool(model)),
             "model must be a non-empty string", "model")
    stream = body.get("stream")
    _require(stream is None or isinstance(stream, bool), "stream must be a boolean", "stream")


def check_embeddings_request(body: Any) -> None:
    _require(isinstance(body, dict), "the request body must be a JSON object", "body")
    value = body.get("input")
    _require(isinstance(value, str | list) and bool(value),
             "input must be a non-empty string or array", "input")


# -- OpenAI ----------------------------------------------------------------------------------

class OpenAIStreamEncoder:
    """OpenAI chunks to `data:` events. Usage-only chunks (asked for by the gateway) reach
    the client only if it asked for them itself."""

    __slots__ = ("include_usage",)

    def __init__(self, include_usage: bool) -> None:
        self.include_usage = include_usage

    def chunk(self, chunk: JsonObject) -> bytes:
        if not self.include_usage and "usage" in chunk:
            if not chunk.get("choices"):
                return b""
            del chunk["usage"]
        return b"data: " + _dumps(chunk) + b"\n\n"

    def error(self, error: JsonObject) -> bytes:
        # The OpenAI SDKs raise an APIError for a stream event carrying `error`.
        return b"data: " + _dumps(error) + b"\n\n"

    def end(self, usage: Usage | None) -> bytes:
        return b"data: [DONE]\n\n"


class OpenAIFront:
    name = "openai"

    def error_body(self, status: int, error: JsonObject) -> bytes:
        return _dumps(error)

    def stream_encoder(self, request: JsonObject, model: str,
                       input_tokens: int = 0) -> OpenAIStreamEncoder:
        options = request.get("stream_options")
        return OpenAIStreamEncoder(isinstance(options, dict) and
                                   options.get("include_usage") is True)

    def chat_response(self, response: JsonObject) -> JsonObject:
        return response

    def models_response(self, response: JsonObject) -> JsonObject:
        return response


# -- Anthropic -------------------------------------------------------------------------------

# OpenAI finish_reason -> Messages stop_reason
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                "function_call": "tool_use", "content_filter": "refusal"}
# Messages error type by HTTP status (Anthropic's "Errors" page).
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                         403: "permission_error", 404: "not_found_error",
                         413: "request_too_large", 429: "rate_limit_error",
                         529: "overloaded_error"}


def _image_part(block: JsonObject, param: str) -> JsonObject:
    source = block.get("source")
    _require(isinstance(source, dict), "an image block needs a source", f"{param}.source")
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
    elif source.get("type") == "url":
        url = source.get("url")
    else:
        raise AdapterError("image source type must be base64 or url", f"{param}.source.type")
    return {"type": "image_url", "image_url": {"url": url}}


def _blocks(content: Any, param: str) -> list[JsonObject]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    _require(isinstance(content, list), "content must be a string or an array of blocks",
             param)
    for index, block in enumerate(content):
        _require(isinstance(block, dict) and isinstance(block.get("type"), str),
                 "each content block must be an object with a type", f"{param}[{index}]")
    return content


def _tool_result_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content
                       if isinstance(b, dict) and b.get("type") == "text")
    return ""


def messages_to_chat(body: Any) -> JsonObject:
    """A Messages request as an OpenAI chat request (400 naming the field when malformed)."""
    _require(isinstance(body, dict), "the request body must be a JSON object", "body")
    max_tokens = body.get("max_tokens")
    _require(isinstance(max_tokens, int) and not isinstance(max_tokens, bool)
             and max_tokens > 0, "max_tokens must be a positive integer", "max_tokens")
    messages_in = body.get("messages")
    _require(isinstance(messages_in, list) and bool(messages_in),
             "messages must be a non-empty array", "messages")
    messages: list[JsonObject] = []
    system = body.get("system")
    if system:
        text = system if isinstance(system, str) else _tool_result_text(
            _blocks(system, "system"))
        messages.append({"role": "system", "content": text})
    for index, message in enumerate(messages_in):
        where = f"messages[{index}]"
        _require(isinstance(message, dict), "each message must be an object", where)
        role = message.get("role")
        _require(role in ("user", "assistant"), "role must be user or assistant",
                 f"{where}.role")
        blocks = _blocks(message.get("content"), f"{where}.content")
        if role == "assistant":
            text = "".join(b.get("text", "") for b in blocks if b["type"] == "text")
            calls = [{"id": b.get("id"), "type": "function",
                      "function": {"name": b.get("name"),
                                   "arguments": json.dumps(b.get("input") or {})}}
                     for b in blocks if b["type"] == "tool_use"]
            out: JsonObject = {"role": "assistant", "content": text or None}
            if calls:
                out["tool_calls"] = calls
            messages.append(out)
            continue
        parts: list[JsonObject] = []
        for block_index, block in enumerate(blocks):
            kind = block["type"]
            param = f"{where}.content[{block_index}]"
            if kind == "text":
                parts.append({"type": "text", "text": block.get("text", "")})
            elif kind == "image":
                parts.append(_image_part(block, param))
            elif kind == "tool_result":
                # OpenAI wants tool answers as their own messages right after the call.
                text = _tool_result_text(block.get("content"))
                if block.get("is_error"):
                    text = f"Error: {text}"
                messages.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                                 "content": text})
            else:
                raise AdapterError(f"content block type {kind!r} is not supported",
                                   f"{param}.type")
        if parts:
            simple = all(part["type"] == "text" for part in parts)
            messages.append({"role": "user", "content": "".join(
                part["text"] for part in parts) if simple and len(parts) == 1 else parts})
    chat: JsonObject = {"messages": messages, "max_tokens": max_tokens}
    if body.get("model") is not None:
        chat["model"] = body["model"]
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get("stop_sequences"):
        chat["stop"] = list(body["stop_sequences"])
    tools = body.get("tools")
    if tools:
        _require(isinstance(tools, list), "tools must be an array", "tools")
        chat["tools"] = []
        for index, tool in enumerate(tools):
            _require(isinstance(tool, dict) and isinstance(tool.get("name"), str),
                     "a tool needs a name", f"tools[{index}]")
            function: JsonObject = {"name": tool["name"],
                                    "parameters": tool.get("input_schema") or
                                    {"type": "object", "properties": {}}}
            if tool.get("description"):
                function["description"] = tool["description"]
            chat["tools"].append({"type": "function", "function": function})
        choice = body.get("tool_choice")
        if isinstance(choice, dict):
            kind = choice.get("type")
            if kind == "any":
                chat["tool_choice"] = "required"
            elif kind == "none":
                chat["tool_choice"] = "none"
            elif kind == "tool":
                chat["tool_choice"] = {"type": "function",
                                       "function": {"name": choice.get("name")}}
            if choice.get("disable_parallel_tool_use"):
                chat["parallel_tool_calls"] = False
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        chat["user"] = metadata["user_id"]
    if body.get("stream"):
        chat["stream"] = True
    return chat


def chat_to_message(response: JsonObject) -> JsonObject:
    """An OpenAI chat.completion as a Messages answer."""
    choices = response.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    content: list[JsonObject] = []
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except ValueError:
            arguments = {}
        content.append({"type": "tool_use", "id": call.get("id"),
                        "name": function.get("name"), "input": arguments})
    usage = response.get("usage") or {}
    return {
        "id": response.get("id") or "msg_gateway", "type": "message", "role": "assistant",
        "model": response.get("model", ""), "content": content,
        "stop_reason": STOP_REASONS.get(choice.get("finish_reason") or "stop", "end_turn"),
        "stop_sequence": None,
        "usage": {"input_tokens": usage.get("prompt_tokens") or 0,
                  "output_tokens": usage.get("completion_tokens") or 0},
    }


def anthropic_error(status: int, error: JsonObject) -> JsonObject:
    """An OpenAI error object in Messages' shape."""
    inner = error.get("error") or {}
    message = str(inner.get("message") or "error")
    if inner.get("param"):
        message = f"{inner['param']}: {message}"
    kind = ANTHROPIC_ERROR_TYPES.get(status, "api_error" if status >= 500 else
                                     "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


class AnthropicStreamEncoder:
    """OpenAI chunks to Messages SSE events, opening and closing content blocks."""

    __slots__ = ("block", "index", "input_tokens", "model", "started", "stop_reason",
                 "tools", "usage")

    def __init__(self, model: str, input_tokens: int) -> None:
        self.model = model
        self.input_tokens = input_tokens  # an estimate: OpenAI reports usage at the end
        self.started = False
        self.block: str | None = None  # kind of the open content block
        self.index = -1  # index of the last content block opened
        self.tools: dict[int, int] = {}  # OpenAI tool_calls index -> content block index
        self.stop_reason = "end_turn"
        self.usage: Usage | None = None

    @staticmethod
    def _event(kind: str, payload: JsonObject) -> bytes:
        return encode_event(_dumps({"type": kind, **payload}), kind)

    def _start(self, chunk: JsonObject) -> bytes:
        self.started = True
        model = chunk.get("model") or self.model
        return self._event("message_start", {"message": {
            "id": chunk.get("id") or "msg_gateway", "type": "message", "role": "assistant",
            "model": model, "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": 0}}})

    def _close(self) -> bytes:
        if self.block is None:
            return b""
        self.block = None
        return self._event("content_block_stop", {"index": self.index})

    def _open(self, block: JsonObject) -> bytes:
        closed = self._close()
        self.index += 1
        self.block = block["type"]
        return closed + self._event("content_block_start",
                                    {"index": self.index, "content_block": block})

    def chunk(self, chunk: JsonObject) -> bytes:
        out = [] if self.started else [self._start(chunk)]
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text:
                if self.block != "text":
                    out.append(self._open({"type": "text", "text": ""}))
                out.append(self._event("content_block_delta", {
                    "index": self.index, "delta": {"type": "text_delta", "text": text}}))
            for call in delta.get("tool_calls") or ():
                slot = call.get("index", 0)
                function = call.get("function") or {}
                if slot not in self.tools:
                    out.append(self._open({"type": "tool_use", "id": call.get("id") or "",
                                           "name": function.get("name") or "",
                                           "input": {}}))
                    self.tools[slot] = self.index
                arguments = function.get("arguments")
                if arguments:
                    out.append(self._event("content_block_delta", {
                        "index": self.tools[slot],
                        "delta": {"type": "input_json_delta", "partial_json": arguments}}))
            if choice.get("finish_reason"):
                self.stop_reason = STOP_REASONS.get(choice["finish_reason"], "end_turn")
        return b"".join(out)

    def error(self, error: JsonObject) -> bytes:
        return self._event("error", {"error": anthropic_error(500, error)["error"]})

    def end(self, usage: Usage | None) -> bytes:
        out = [] if self.started else [self._start({})]
        out.append(self._close())
        figures: JsonObject = {"output_tokens": usage.completion_tokens if usage else 0}
        if usage is not None:
            figures["input_tokens"] = usage.prompt_tokens
        out.append(self._event("message_delta", {
            "delta": {"stop_reason": self.stop_reason, "stop_sequence": None},
            "usage": figures}))
        out.append(self._event("message_stop", {}))
        return b"".join(out)


class AnthropicFront:
    name = "anthropic"

    def error_body(self, status: int, error: JsonObject) -> bytes:
        return _dumps(anthropic_error(status, error))

    def stream_encoder(self, request: JsonObject, model: str,
                       input_tokens: int = 0) -> AnthropicStreamEncoder:
        return AnthropicStreamEncoder(model, input_tokens)

    def chat_response(self, response: JsonObject) -> JsonObject:
        return chat_to_message(response)

    def models_response(self, response: JsonObject) -> JsonObject:
        models = []
        for model in response.get("data") or ():
            created = model.get("created") if isinstance(model.get("created"), int) else 0
            models.append({"type": "model", "id": model.get("id"),
                           "display_name": model.get("id"),
                           "created_at": datetime.fromtimestamp(created, UTC)
                           .strftime("%Y-%m-%dT%H:%M:%SZ")})
        return {"data": models, "has_more": False,
                "first_id": models[0]["id"] if models else None,
                "last_id": models[-1]["id"] if models else None}


OPENAI_FRONT = OpenAIFront()
ANTHROPIC_FRONT = AnthropicFront()
