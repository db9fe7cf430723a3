"""ai-prompt-template: config checks, filling templates, then routes turned into REST APIs
through a running gateway whose ai-proxy calls the fake Gemini API (which answers
`echo: <the last user text>`, so the answer shows the filled prompt)."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

import pytest

from servers.fake_gemini import FakeGemini
from sluicegate.ai.adapter import AdapterError
from sluicegate.http.context import RequestContext
from sluicegate.plugins.ai_prompt_template import AiPromptTemplate
from sluicegate.plugins.base import PluginEnv, validate_plugin

PATH = "routes[0].plugins.ai-prompt-template"
KEY = "gemini-key-pt"
TEMPLATES = [
    {"name": "translate", "template": {
        "model": "gemini-2.0-flash", "temperature": 0.1,
        "messages": [{"role": "system", "content": "You translate into {{ language }}."},
                     {"role": "user", "content": "Translate {{text}} into {{language}}"}]}},
    {"name": "count", "template": {
        "messages": [{"role": "user", "content": "Say {{n}} words about {{topic}}"}]}},
]


def errors_of(conf: dict[str, Any]) -> list[str]:
    return validate_plugin("ai-prompt-template", conf, PATH)[2]


def plugin(**conf: Any) -> AiPromptTemplate:
    model, _, errors = validate_plugin("ai-prompt-template", conf, PATH)
    assert errors == []
    return AiPromptTemplate(model, PluginEnv())


CTX = RequestContext("POST", "/translate", "", [(b"Host", b"gw")], "gw", ("192.0.2.1", 1),
                     ("10.0.0.1", 9080), "1.1")


# -- config and filling -----------------------------------------------------------------------


def test_prompt_template_config_errors_name_the_field():
    assert errors_of({"templates": []})[0].startswith(f"{PATH}.templates: ")
    assert errors_of({"templates": [TEMPLATES[0], TEMPLATES[0]]}) == [
        f"{PATH}.templates[1].name: 'translate' is used by an earlier template"]
    assert errors_of({"templates": TEMPLATES, "template_name": "nope"}) == [
        f"{PATH}.template_name: no template named 'nope'"]
    bad_role = {"name": "x", "template": {"messages": [{"role": "robot", "content": "a"}]}}
    assert errors_of({"templates": [bad_role]}) == [
        f"{PATH}.templates[0].template.messages[0].role: must be one of system, developer, "
        "user, assistant"]
    no_messages = {"name": "x", "template": {"messages": []}}
    assert errors_of({"templates": [no_messages]})[0].startswith(
        f"{PATH}.templates[0].template.messages: ")


def test_prompt_template_fills_every_placeholder():
    request = plugin(templates=TEMPLATES).ai_body(
        CTX, {"template_name": "translate", "text": "good morning", "language": "French",
              "unused": 1})
    assert request == {
        "model": "gemini-2.0-flash", "temperature": 0.1,
        "messages": [{"role": "system", "content": "You translate into French."},
                     {"role": "user", "content": "Translate good morning into French"}]}


def test_prompt_template_writes_non_string_values_as_json():
    request = plugin(templates=TEMPLATES).ai_body(
        CTX, {"template_name": "count", "n": 3, "topic": ["tea", "milk"]})
    assert request["messages"][0]["content"] == 'Say 3 words about ["tea", "milk"]'


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"template_name": "translate", "text": "hi"}, "language",
     "missing variable 'language' for template 'translate'"),
    ({"template_name": "summarise"}, "template_name",
     "unknown template 'summarise' (this API has: count, translate)"),
    ({"text": "hi"}, "template_name", "template_name is required: one of count, translate"),
    (["not", "an", "object"], "body",
     "the request body must be a JSON object of template variables"),
    ({"template_name": "count", "n": 1, "topic": "x", "stream": "yes"}, "stream",
     "stream must be a boolean"),
])
def test_prompt_template_bad_body_is_a_400_naming_the_field(body, param, message):
    with pytest.raises(AdapterError) as caught:
        plugin(templates=TEMPLATES).ai_body(CTX, body)
    assert (caught.value.status, caught.value.param, caught.value.message) == \
        (400, param, message)


def test_prompt_template_fixed_template_takes_only_variables():
    fixed = plugin(templates=TEMPLATES, template_name="count")
    request = fixed.ai_body(CTX, {"n": 5, "topic": "rain", "stream": True})
    assert request["messages"][0]["content"] == "Say 5 words about rain"
    assert request["stream"] is True
    with pytest.raises(AdapterError) as caught:
        fixed.ai_body(CTX, {"template_name": "translate", "n": 5, "topic": "rain"})
    assert caught.value.param == "template_name"


# -- through the gateway ----------------------------------------------------------------------


@pytest.fixture
def fake_gemini() -> Iterator[FakeGemini]:
    fake = FakeGemini(api_key=KEY).start()
    yield fake
    fake.stop()


def template_gateway(start_gateway: Any, fake: FakeGemini, **template: Any) -> Any:
    ai_proxy = {"provider": "gemini", "auth": {"header": {"x-goog-api-key": KEY}},
                "override": {"endpoint": f"{fake.url}/v1beta"},
                "options": {"model": "gemini-2.0-flash"}}
    return start_gateway({"routes": [{
        "id": "prompt-api", "uri": "/api/*", "methods": ["POST"],
        "plugins": {"ai-proxy": ai_proxy,
                    "ai-prompt-template": {"templates": TEMPLATES, **template}}}]})


def post(gateway: Any, path: str, body: Any) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    try:
        connection.request("POST", path, json.dumps(body).encode(),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_prompt_api_answers_with_the_models_answer(start_gateway, fake_gemini):
    gateway = template_gateway(start_gateway, fake_gemini)
    status, _, body = post(gateway, "/api/translate", {
        "template_name": "translate", "text": "good morning", "language": "French"})
    assert status == 200, body
    answer = json.loads(body)
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"] == \
        "echo: Translate good morning into French"
    assert answer["usage"]["total_tokens"] > 0
    sent = fake_gemini.requests[-1].body
    assert sent["systemInstruction"] == {"parts": [{"text": "You translate into French."}]}
    assert sent["generationConfig"] == {"temperature": 0.1}


def test_prompt_api_missing_variable_is_a_400_naming_it(start_gateway, fake_gemini):
    gateway = template_gateway(start_gateway, fake_gemini)
    status, _, body = post(gateway, "/api/translate", {"template_name": "translate",
                                                       "text": "hi"})
    assert status == 400
    assert json.loads(body) == {"error": {
        "message": "missing variable 'language' for template 'translate'",
        "type": "invalid_request_error", "param": "language", "code": "missing_variable"}}
    status, _, body = post(gateway, "/api/translate", {"template_name": "poem"})
    assert status == 400
    assert json.loads(body)["error"]["param"] == "template_name"
    assert fake_gemini.requests == []  # nothing reached the provider


def test_prompt_api_with_a_fixed_template_streams_when_asked(start_gateway, fake_gemini):
    gateway = template_gateway(start_gateway, fake_gemini, template_name="count")
    status, headers, body = post(gateway, "/api/words", {"n": 3, "topic": "tea",
                                                         "stream": True})
    assert status == 200
    assert headers["Content-Type"] == "text/event-stream"
    events = [line[len("data: "):] for line in body.decode().split("\n")
              if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "")
                   for e in events[:-1] if json.loads(e)["choices"])
    assert text == "echo: Say 3 words about tea"
