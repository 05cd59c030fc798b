"""`npgpt serve`: an OpenAI-compatible HTTP server with continuous batching, and a chat page.

    protocol.py   the request types and errors: ApiError (OpenAI's error body), Params (a request's
                  validated generation settings)
    engine.py     the one decoding thread: continuous batching over the slots of one KV cache
    http.py       the HTTP side: App (requests in, responses out), Handler, make_server, serve()
    metrics.py    Metrics (GET /metrics, Prometheus' text format) and RequestLog (one JSON line per request)
    static/       chat.html, the chat page served at /

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (the model's chat
template, see npgpt.sft), GET / (static/chat.html), GET /health, GET /metrics, POST /tokenize,
POST /detokenize. A request's `model` may name a LoRA adapter served beside the base
(`serve(adapters=[(name, folder)])`; rows of different adapters share the decoding batch). Requests and responses follow OpenAI's
shapes, including server-sent events for `stream` (ending with `data: [DONE]`), logprobs and
usage; invalid values get a 400 with OpenAI's error body {"error": {message, type, param, code}}.
"""
