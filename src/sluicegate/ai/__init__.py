"""The AI gateway's logic: provider adapters, token accounting, and the serving code the AI
plugins share (its I/O goes through `provider_client` and the exchange's writer).

- `adapter`: the provider adapter contract (read its docstring before adding a provider),
  shared shapes and the registry `ADAPTERS` (provider name -> adapter object);
- `openai`: the OpenAI family (openai, azure-openai, deepseek, mistral, ollama,
  openai-compatible); `anthropic`: Anthropic's Messages API; `gemini`: Google's Gemini
  API; `wenxin`: Baidu's ERNIE (with its OAuth token exchange);
- `front`: the client-facing APIs (OpenAI's, and Anthropic's Messages translated);
- `tokens`: token estimates when a provider reports none; `accounting`: the per-request
  record (`AiRecord`) behind metrics, the access log and the token and spend budgets;
- `provider_client`: the aiohttp session providers are called with;
- `serving`: serving one request from one provider (`ProviderEndpoint`: the provider's
  request, relaying its answer, error or stream) and the log-phase accounting.

The plugins that use them: `plugins/ai_proxy.py` (one provider) and
`plugins/ai_proxy_multi.py` (several instances, balanced, with fallback) serve through
`serving`; `plugins/ai_budget.py` prices the record's tokens (it hands its pricer over in
ctx.vars, see `accounting.AI_PRICER_VAR`), `plugins/ai_rate_limiting.py` charges them to
token budgets, and `ai_prompt_template.py` / `ai_model_acl.py` shape or refuse requests
through the `ai_body` / `ai_request` hooks that `serving` calls.
"""
