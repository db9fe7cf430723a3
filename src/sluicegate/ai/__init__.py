"""The AI gateway's logic: provider adapters and token accounting (no I/O but
`provider_client`).

- `adapter`: the provider adapter contract (read its docstring before adding a provider),
  shared shapes and the registry `ADAPTERS` (provider name -> adapter object);
- `openai`: the OpenAI family (openai, azure-openai, deepseek, mistral, ollama,
  openai-compatible); `anthropic`: Anthropic's Messages API;
- `front`: the client-facing APIs (OpenAI's, and Anthropic's Messages translated);
- `tokens`: token estimates when a provider reports none; `accounting`: the per-request
  record behind metrics and the access log;
- `provider_client`: the aiohttp session providers are called with.

The plugin that puts these together is `plugins/ai_proxy.py`.
"""
