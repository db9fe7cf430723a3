-- wrk script of bench/ai.sh: POST a non-streamed OpenAI chat completion request.
-- The key comes from AI_BENCH_KEY (LiteLLM's master key; the other targets ignore or
-- accept it), the model from AI_BENCH_MODEL (default fake-model).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("AI_BENCH_KEY") or "sk-bench")
wrk.body = '{"model":"' .. (os.getenv("AI_BENCH_MODEL") or "fake-model") ..
    '","messages":[{"role":"user","content":"hello benchmark"}]}'
