"""ai-model-acl: which models a consumer may use through ai-proxy.

Put it on a consumer (or a consumer group) to give that consumer an allow-list: its AI
requests naming any other model are answered 403 with an OpenAI error object naming the
model, before the provider is called. On a route, it applies to every consumer of the
route. The model checked is the one the provider gets: the route's ai-proxy
`options.model` when it sets one, else the request's `model`.

Hook: ai-proxy calls `ai_request(ctx, request)` on plugins of the chain that have it, with
the chat or embeddings request it is about to send (options merged).
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

from pydantic import ConfigDict, Field, model_validator

from sluicegate.ai.adapter import AdapterError
from sluicegate.http.context import RequestContext
from sluicegate.plugins.base import Plugin, PluginConfig, PluginEnv, register


class AiModelAclConfig(PluginConfig):
    """ai-model-acl options: `allow`, `deny`, or both (deny wins)."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    allow: list[str] | None = Field(None, min_length=1)
    """Models that may be used; shell-style patterns (`gpt-4o-mini`, `gemini-*`,
    `claude-3-?-haiku*`). Any other model is refused."""
    deny: list[str] = Field(default_factory=list)
    """Models that may not be used (patterns as in `allow`), even when allowed."""
    rejected_code: int = Field(403, ge=400, le=499)
    """Status of the answer to a request for a refused model."""

    @model_validator(mode="after")
    def _a_list(self) -> AiModelAclConfig:
        if self.allow is None and not self.deny:
            raise ValueError("allow: give allow, deny or both")
        for field in ("allow", "deny"):
            for index, pattern in enumerate(getattr(self, field) or ()):
                if not pattern.strip():
                    raise ValueError(f"{field}[{index}]: must not be empty")
        return self


def _matcher(patterns: list[str]) -> re.Pattern[str]:
    # One regex for the whole list: one match per request however long the list is.
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


@register
class AiModelAcl(Plugin):
    """Refuses AI requests for models the consumer may not use (403 naming the model)."""

    name = "ai-model-acl"
    # Below the auth plugins (consumer known) and with the other AI plugins; it acts when
    # ai-proxy has read the request, so only its order among `ai_request` hooks matters.
    priority = 1050
    schema = AiModelAclConfig

    def __init__(self, conf: AiModelAclConfig, env: PluginEnv) -> None:
        super().__init__(conf, env)
        self.allow = _matcher(conf.allow) if conf.allow is not None else None
        self.deny = _matcher(conf.deny) if conf.deny else None
        self.status = conf.rejected_code

    def ai_request(self, ctx: RequestContext, request: dict[str, Any]) -> None:
        model = request.get("model")
        model = model if isinstance(model, str) else ""
        if (self.allow is None or self.allow.match(model)) and \
                (self.deny is None or not self.deny.match(model)):
            return
        who = f"consumer {ctx.consumer_name!r}" if ctx.consumer_name else "this route"
        what = f"model {model!r}" if model else "a request naming no model"
        raise AdapterError(f"{what} is not allowed for {who}", "model", status=self.status,
                           type="permission_error", code="model_not_allowed")
