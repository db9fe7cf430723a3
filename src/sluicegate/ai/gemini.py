"""Google Gemini (the Generative Language API) as a provider: OpenAI chat, embeddings and
models requests to generateContent / batchEmbedContents / models, and back.

Wire format (ai.google.dev/api):

- `POST {base}/models/{model}:generateContent`; streams use
  `:streamGenerateContent?alt=sse` (without `alt=sse` Google streams one JSON array, which
  cannot be translated event by event); `{base}` ends in the API version (`/v1beta`);
- the API key goes in `x-goog-api-key` (`auth.header`) or the `key` query argument
  (`auth.query`);
- `contents: [{role: user|model, parts: [{text} | {inlineData: {mimeType, data}}]}]`,
  system messages in `systemInstruction`, sampling options in `generationConfig`;
- answers `candidates[].content.parts[].text` with `finishReason`, and `usageMetadata`
  (`promptTokenCount`, `candidatesTokenCount`, `thoughtsTokenCount`, `totalTokenCount`);
- a stream is SSE, one `data: {GenerateContentResponse}` per event and no `[DONE]`: the
  event with the `finishReason` carries the final `usageMetadata`;
- errors are `{"error": {"code": 400, "message": "...", "status": "INVALID_ARGUMENT"}}`.

Pure functions; plugins/ai_proxy.py does the I/O.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote, urlencode

from sluicegate.ai.adapter import (
    MAX_ERROR_MESSAGE,
    AdapterError,
    JsonObject,
    ProviderRequest,
    ProviderTarget,
    StreamError,
    Usage,
    chunk_template,
    error_type_for,
    joined_text_parts,
    json_events,
    openai_error,
    plain_error_text,
)
from sluicegate.proto.sse import SseParser

# Gemini finishReason -> OpenAI finish_reason. Every safety-type stop is `content_filter`
# (what OpenAI reports when its own filter cut the answer); reasons OpenAI has no word for
# end as `stop`: the answer is complete as far as the client can tell.
FINISH_REASONS = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "LANGUAGE": "stop",
    "OTHER": "stop",
    "FINISH_REASON_UNSPECIFIED": "stop",
    "MALFORMED_FUNCTION_CALL": "stop",
}

# google.rpc.Code names -> OpenAI error `type` (SDKs pick their exception by HTTP status;
# the type is for clients reading the body).
ERROR_TYPES = {
    "INVALID_ARGUMENT": "invalid_request_error",
    "FAILED_PRECONDITION": "invalid_request_error",
    "OUT_OF_RANGE": "invalid_request_error",
    "NOT_FOUND": "not_found_error",
    "UNAUTHENTICATED": "authentication_error",
    "PERMISSION_DENIED": "permission_error",
    "RESOURCE_EXHAUSTED": "rate_limit_error",
    "DEADLINE_EXCEEDED": "timeout",
    "UNAVAILABLE": "api_error",
    "INTERNAL": "api_error",
}

# OpenAI sampling options -> generationConfig fields (same meaning and range).
GENERATION_OPTIONS = {
    "temperature": "temperature",
    "top_p": "topP",
    "top_k": "topK",
    "n": "candidateCount",
    "presence_penalty": "presencePenalty",
    "frequency_penalty": "frequencyPenalty",
    "seed": "seed",
}


def _fail(message: str, param: str) -> AdapterError:
    return AdapterError(message, param=param)


def _model_path(body: JsonObject) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _fail("gemini needs a model (in the request or the route's options.model)",
                    "model")
    # Google's own listings name models `models/gemini-...`; both spellings work.
    return "/models/" + quote(model.removeprefix("models/"), safe="-._~")


def _url(target: ProviderTarget, path: str, extra: list[tuple[str, str]] | None = None
         ) -> str:
    query = [*(extra or ()), *target.query]
    url = target.base_url + path
    return f"{url}?{urlencode(query)}" if query else url


def _text_of(content: Any, param: str) -> str:
    """The text of a system message (a string, or text parts)."""
    return joined_text_parts(content, param, joiner="\n",
                             parts_only="a system message takes text parts only")


def _image_part(part: JsonObject, param: str) -> JsonObject:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise _fail("image_url.url must be a string", f"{param}.image_url.url")
    # Inline images only: fileData takes files uploaded to Google, and the gateway does
    # not download anything on a client's behalf.
    head, comma, data = url.partition(",")
    if not url.startswith("data:") or not comma or not head.endswith(";base64"):
        raise _fail("gemini takes images as base64 data URLs (data:image/png;base64,...)",
                    f"{param}.image_url.url")
    return {"inlineData": {"mimeType": head[5:].removesuffix(";base64"), "data": data}}


def _parts(content: Any, param: str) -> list[JsonObject]:
    if isinstance(content, str):
        return [{"text": content}]
    if not isinstance(content, list):
        raise _fail("content must be a string or a list of parts", param)
    parts = []
    for index, part in enumerate(content):
        where = f"{param}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"text": part["text"]})
        elif kind == "image_url":
            parts.append(_image_part(part, where))
        else:
            raise _fail(f"content part type {kind!r} is not supported by gemini",
                        f"{where}.type")
    return parts


def to_generate_request(body: JsonObject) -> JsonObject:
    """A GenerateContentRequest for an OpenAI chat completions request (whose shape
    front.check_chat_request has checked)."""
    system: list[str] = []
    contents: list[JsonObject] = []
    for index, message in enumerate(body["messages"]):
        param = f"messages[{index}]"
        role = message["role"]
        content = message.get("content")
        if role in ("system", "developer"):
            system.append(_text_of(content, f"{param}.content"))
            continue
        if role not in ("user", "assistant"):
            raise _fail(f"role {role!r} is not supported by gemini (no tool calling)",
                        f"{param}.role")
        if message.get("tool_calls"):
            raise _fail("tool calls are not supported by gemini", f"{param}.tool_calls")
        if content is None:
            raise _fail("content is required", f"{param}.content")
        gemini_role = "user" if role == "user" else "model"
        parts = _parts(content, f"{param}.content")
        # Consecutive turns of one role become one turn: Gemini wants them alternating.
        if contents and contents[-1]["role"] == gemini_role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": gemini_role, "parts": parts})
    if not contents:
        raise _fail("gemini needs at least one user or assistant message", "messages")
    for name in ("tools", "functions"):
        if body.get(name):
            raise _fail("tool calling is not supported by gemini", name)
    request: JsonObject = {"contents": contents}
    if system:
        request["systemInstruction"] = {"parts": [{"text": "\n".join(system)}]}
    config: JsonObject = {}
    for option, field in GENERATION_OPTIONS.items():
        value = body.get(option)
        if value is not None:
            config[field] = value
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if max_tokens is not None:
        config["maxOutputTokens"] = max_tokens
    stop = body.get("stop")
    if stop:
        config["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    response_format = body.get("response_format")
    if isinstance(response_format, dict):
        kind = response_format.get("type")
        if kind in ("json_object", "json_schema"):
            config["responseMimeType"] = "application/json"
        schema = response_format.get("json_schema")
        if kind == "json_schema" and isinstance(schema, dict) and "schema" in schema:
            config["responseJsonSchema"] = schema["schema"]
    if config:
        request["generationConfig"] = config
    return request


def usage_of(metadata: Any) -> Usage | None:
    """`usageMetadata` as Usage. Thinking models count their thoughts apart; they are
    billed as output, so they are completion tokens here (as OpenAI counts reasoning)."""
    if not isinstance(metadata, dict) or not isinstance(metadata.get("promptTokenCount"),
                                                        int):
        return None
    prompt = metadata["promptTokenCount"]
    completion = (metadata.get("candidatesTokenCount") or 0) + \
        (metadata.get("thoughtsTokenCount") or 0)
    total = metadata.get("totalTokenCount")
    return Usage(prompt, completion, total if isinstance(total, int) else None)


def _candidate_text(candidate: JsonObject) -> str:
    content = candidate.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    if not isinstance(parts, list):
        return ""
    # Thought summaries (`thought: true`) are the model's reasoning, not its answer.
    return "".join(part["text"] for part in parts
                   if isinstance(part, dict) and isinstance(part.get("text"), str)
                   and not part.get("thought"))


def _finish_reason(candidate: JsonObject) -> str | None:
    reason = candidate.get("finishReason")
    return None if reason is None else FINISH_REASONS.get(str(reason), "stop")


def _response_id(data: JsonObject) -> str:
    response_id = data.get("responseId")
    return f"chatcmpl-{response_id}" if isinstance(response_id, str) and response_id \
        else "chatcmpl-gemini"


def error_object(status: int, body: bytes) -> JsonObject:
    """Google's `{"error": {"code", "message", "status"}}` (or anything a proxy in between
    sent) as an OpenAI error object; `code` is the lower-cased google.rpc status."""
    try:
        data = json.loads(body)
    except ValueError:
        return openai_error(plain_error_text(body), error_type_for(status))
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = data[0]  # streamGenerateContent without alt=sse wraps errors in an array
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return openai_error(plain_error_text(body), error_type_for(status))
    rpc_status = error.get("status") if isinstance(error.get("status"), str) else None
    kind = "rate_limit_error" if status == 429 else \
        ERROR_TYPES.get(rpc_status or "", error_type_for(status))
    return openai_error(error["message"][:MAX_ERROR_MESSAGE], kind, None,
                        rpc_status.lower() if rpc_status else None)


class GeminiStream:
    """Gemini SSE events (each a GenerateContentResponse) to OpenAI chunks. The event with
    the finishReason ends the answer: its chunk, then a usage-only chunk."""

    __slots__ = ("created", "done", "id", "model", "parser", "role_sent", "usage")

    def __init__(self, model: str, created: int) -> None:
        self.parser = SseParser()
        self.model = model
        self.created = created
        self.id = "chatcmpl-gemini"
        self.role_sent: set[int] = set()
        self.usage: Usage | None = None
        self.done = False

    def _chunk(self, choices: list[JsonObject]) -> JsonObject:
        chunk = chunk_template(self.id, self.model, self.created)
        chunk["choices"] = choices
        return chunk

    def feed(self, data: bytes) -> list[JsonObject]:
        chunks: list[JsonObject] = []
        for event, payload in json_events(self.parser, data):
            if "error" in payload:
                raise StreamError(error_object(500, event.data.encode()))
            chunks += self._event(payload)
        return chunks

    def _event(self, payload: JsonObject) -> list[JsonObject]:
        if not self.role_sent and isinstance(payload.get("responseId"), str):
            self.id = _response_id(payload)
        if isinstance(payload.get("modelVersion"), str):
            self.model = payload["modelVersion"]
        usage = usage_of(payload.get("usageMetadata"))
        if usage is not None:
            self.usage = usage  # repeated as the answer grows: the last one counts
        choices: list[JsonObject] = []
        candidates = payload.get("candidates")
        if isinstance(candidates, list) and candidates:
            for position, candidate in enumerate(candidates):
                if not isinstance(candidate, dict):
                    continue
                index = candidate.get("index", position)
                delta: JsonObject = {}
                if index not in self.role_sent:
                    self.role_sent.add(index)
                    delta["role"] = "assistant"
                text = _candidate_text(candidate)
                if text:
                    delta["content"] = text
                reason = _finish_reason(candidate)
                if delta or reason is not None:
                    choices.append({"index": index, "delta": delta,
                                    "finish_reason": reason})
                if reason is not None:
                    self.done = True
        else:
            feedback = payload.get("promptFeedback")
            if isinstance(feedback, dict) and feedback.get("blockReason"):
                # The prompt itself was blocked: an empty, filtered answer.
                self.done = True
                choices.append({"index": 0, "delta": {"role": "assistant"},
                                "finish_reason": "content_filter"})
        out = [self._chunk(choices)] if choices else []
        if self.done and self.usage is not None:
            usage_chunk = self._chunk([])
            usage_chunk["usage"] = self.usage.as_openai()
            out.append(usage_chunk)
        return out


class GeminiAdapter:
    name = "gemini"
    default_endpoint = "https://generativelanguage.googleapis.com/v1beta"
    kinds = frozenset({"chat", "embeddings", "models"})

    def chat_request(self, body: JsonObject, target: ProviderTarget) -> ProviderRequest:
        path = _model_path(body)
        headers = {"Content-Type": "application/json", **target.headers}
        if body.get("stream"):
            headers["Accept"] = "text/event-stream"
            url = _url(target, path + ":streamGenerateContent", [("alt", "sse")])
        else:
            url = _url(target, path + ":generateContent")
        return ProviderRequest("POST", url, headers, to_generate_request(body))

    def chat_response(self, data: JsonObject, created: int) -> JsonObject:
        choices = []
        candidates = data.get("candidates")
        if isinstance(candidates, list) and candidates:
            for position, candidate in enumerate(candidates):
                if isinstance(candidate, dict):
                    choices.append({
                        "index": candidate.get("index", position),
                        "message": {"role": "assistant",
                                    "content": _candidate_text(candidate)},
                        "logprobs": None,
                        "finish_reason": _finish_reason(candidate) or "stop"})
        else:
            # The prompt itself was blocked (promptFeedback.blockReason): no candidates.
            choices.append({"index": 0, "message": {"role": "assistant", "content": ""},
                            "logprobs": None, "finish_reason": "content_filter"})
        result: JsonObject = {"id": _response_id(data), "object": "chat.completion",
                              "created": created, "model": data.get("modelVersion") or "",
                              "choices": choices}
        usage = usage_of(data.get("usageMetadata"))
        if usage is not None:
            result["usage"] = usage.as_openai()
        return result

    def stream_translator(self, model: str, created: int) -> GeminiStream:
        return GeminiStream(model, created)

    def embeddings_request(self, body: JsonObject, target: ProviderTarget) -> ProviderRequest:
        path = _model_path(body)
        texts = body["input"]
        if isinstance(texts, str):
            texts = [texts]
        requests = []
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise _fail("gemini embeds text (token arrays are not supported)",
                            f"input[{index}]")
            request: JsonObject = {"model": path.removeprefix("/"),
                                   "content": {"parts": [{"text": text}]}}
            if isinstance(body.get("dimensions"), int):
                request["outputDimensionality"] = body["dimensions"]
            requests.append(request)
        headers = {"Content-Type": "application/json", **target.headers}
        return ProviderRequest("POST", _url(target, path + ":batchEmbedContents"), headers,
                               {"requests": requests})

    def embeddings_response(self, data: JsonObject) -> JsonObject:
        embeddings = data.get("embeddings")
        if not isinstance(embeddings, list):
            raise AdapterError("gemini answered without embeddings", status=502,
                               type="api_error")
        # batchEmbedContents reports no token usage.
        return {"object": "list", "model": "",
                "data": [{"object": "embedding", "index": index,
                          "embedding": item.get("values", []) if isinstance(item, dict)
                          else []} for index, item in enumerate(embeddings)],
                "usage": {"prompt_tokens": 0, "total_tokens": 0}}

    def models_request(self, target: ProviderTarget) -> ProviderRequest:
        return ProviderRequest("GET", _url(target, "/models"), dict(target.headers))

    def models_response(self, data: JsonObject) -> JsonObject:
        models = []
        for model in data.get("models") or ():
            if isinstance(model, dict) and isinstance(model.get("name"), str):
                models.append({"id": model["name"].removeprefix("models/"), "object": "model",
                               "created": 0, "owned_by": "google"})
        return {"object": "list", "data": models}

    def error(self, status: int, body: bytes) -> JsonObject:
        return error_object(status, body)


GEMINI = GeminiAdapter()
