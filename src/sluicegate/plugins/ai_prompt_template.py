"""ai-prompt-template: turn a route into an API whose JSON body fills a prompt template
("prompt -> REST API", as APIPark does; APISIX's option names).

The route carries `ai-proxy` too. A client posts `{"template_name": "...", "var": value,
...}` (or just the variables, when the route fixes `template_name`); every `{{var}}` in
the template is replaced by the variable's value, and the filled template — an OpenAI chat
request — goes on to ai-proxy, whose answer (an OpenAI chat completion, or a stream when the
body says `"stream": true`) is the API's answer. A variable the template needs and the body
lacks is a 400 naming it; so is an unknown template.

Hook: ai-proxy calls `ai_body(ctx, body)` on plugins of the chain that have it, with the
request body parsed, before it checks the body as a chat request.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sluicegate.ai.adapter import AdapterError
from sluicegate.http.context import RequestContext
from sluicegate.plugins.base import Plugin, PluginConfig, PluginEnv, register

# `{{name}}` or `{{ name }}`; other `{{...}}` text is left as it is.
VARIABLE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
# Body fields that are not template variables.
TEMPLATE_NAME_FIELD = "template_name"
STREAM_FIELD = "stream"
ROLES = ("system", "developer", "user", "assistant")


class TemplateMessage(BaseModel):
    """One message of a template."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    role: str
    """system, developer, user or assistant."""
    content: str = Field(min_length=1)
    """The text, with `{{variable}}` placeholders."""

    @field_validator("role")
    @classmethod
    def _role(cls, value: str) -> str:
        if value not in ROLES:
            raise ValueError(f"must be one of {', '.join(ROLES)}")
        return value


class TemplateBody(BaseModel):
    """The chat request a template makes: `messages`, optionally `model`, and any other
    OpenAI chat option (`temperature`, `max_tokens`...) sent as given."""

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)

    model: str | None = None
    """The model; without it, the route's ai-proxy `options.model` names it."""
    messages: list[TemplateMessage] = Field(min_length=1)
    """The prompt, as chat messages."""


class PromptTemplate(BaseModel):
    """A named template."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: str = Field(min_length=1)
    """What clients put in `template_name`."""
    template: TemplateBody
    """The chat request, with `{{variable}}` placeholders in its strings."""


class AiPromptTemplateConfig(PluginConfig):
    """ai-prompt-template options."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    templates: list[PromptTemplate] = Field(min_length=1)
    """The templates this route offers."""
    template_name: str | None = None
    """The template every request uses; the body then holds only the variables (and may
    not choose another template). Without it the body's `template_name` picks one."""

    @model_validator(mode="after")
    def _names(self) -> AiPromptTemplateConfig:
        seen: set[str] = set()
        for index, template in enumerate(self.templates):
            if template.name in seen:
                raise ValueError(f"templates[{index}].name: {template.name!r} is used by an "
                                 "earlier template")
            seen.add(template.name)
        if self.template_name is not None and self.template_name not in seen:
            raise ValueError(f"template_name: no template named {self.template_name!r}")
        return self


# A compiled string: literal text and variable names, alternating (even: text, odd: name).
Pieces = tuple[str, ...]


def _compile(value: Any, variables: list[str]) -> Any:
    """The template with each string holding variables turned into Pieces (appending the
    names to `variables` in order of appearance)."""
    if isinstance(value, str):
        pieces = VARIABLE.split(value)
        if len(pieces) == 1:
            return value
        for name in pieces[1::2]:
            if name not in variables:
                variables.append(name)
        return _Filled(tuple(pieces))
    if isinstance(value, dict):
        return {key: _compile(item, variables) for key, item in value.items()}
    if isinstance(value, list):
        return [_compile(item, variables) for item in value]
    return value


class _Filled:
    """A string of a template that holds variables."""

    __slots__ = ("pieces",)

    def __init__(self, pieces: Pieces) -> None:
        self.pieces = pieces


def _text(value: Any) -> str:
    # Strings go in as they are; anything else as its JSON (numbers, true, lists...).
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _fill(value: Any, variables: dict[str, Any]) -> Any:
    if isinstance(value, _Filled):
        pieces = value.pieces
        return "".join(piece if index % 2 == 0 else _text(variables[piece])
                       for index, piece in enumerate(pieces))
    if isinstance(value, dict):
        return {key: _fill(item, variables) for key, item in value.items()}
    if isinstance(value, list):
        return [_fill(item, variables) for item in value]
    return value


class _Compiled:
    __slots__ = ("body", "name", "variables")

    def __init__(self, template: PromptTemplate) -> None:
        self.name = template.name
        self.variables: list[str] = []
        self.body = _compile(template.template.model_dump(exclude_none=True), self.variables)


@register
class AiPromptTemplate(Plugin):
    """Fills the chosen template with the request body's variables and hands the chat
    request it makes to the route's ai-proxy."""

    name = "ai-prompt-template"
    priority = 1071  # APISIX's: before ai-prompt-decorator and ai-proxy
    schema = AiPromptTemplateConfig

    def __init__(self, conf: AiPromptTemplateConfig, env: PluginEnv) -> None:
        super().__init__(conf, env)
        self.templates = {template.name: _Compiled(template) for template in conf.templates}
        self.fixed = self.templates[conf.template_name] if conf.template_name else None

    def ai_body(self, ctx: RequestContext, body: Any) -> dict[str, Any]:
        """The chat request for a request body of variables (AdapterError 400 naming the
        field when the body does not fit)."""
        if not isinstance(body, dict):
            raise AdapterError("the request body must be a JSON object of template "
                               "variables", "body")
        template = self.fixed
        if template is None:
            name = body.get(TEMPLATE_NAME_FIELD)
            if not isinstance(name, str) or not name:
                raise AdapterError("template_name is required: one of "
                                   f"{', '.join(sorted(self.templates))}", TEMPLATE_NAME_FIELD,
                                   code="missing_template_name")
            template = self.templates.get(name)
            if template is None:
                raise AdapterError(f"unknown template {name!r} (this API has: "
                                   f"{', '.join(sorted(self.templates))})",
                                   TEMPLATE_NAME_FIELD, code="unknown_template")
        elif body.get(TEMPLATE_NAME_FIELD) not in (None, template.name):
            raise AdapterError(f"this API has one template, {template.name!r}",
                               TEMPLATE_NAME_FIELD, code="unknown_template")
        for variable in template.variables:
            if variable not in body:
                raise AdapterError(f"missing variable {variable!r} for template "
                                   f"{template.name!r}", variable, code="missing_variable")
        request = _fill(template.body, body)
        stream = body.get(STREAM_FIELD)
        if stream is not None:
            if not isinstance(stream, bool):
                raise AdapterError("stream must be a boolean", STREAM_FIELD)
            request[STREAM_FIELD] = stream
        return request
