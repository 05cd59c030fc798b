"""`npgpt serve`: an OpenAI-compatible HTTP server with continuous batching, and a chat page.

    protocol.py   the request types and errors: ApiError (OpenAI's error body), Params (a request's
                  validated generation settings)
    engine.py     the one decoding thread: continuous batching over the slots of one KV cache
    http.py       the HTTP side: App (requests in, responses out), Handler, make_server, serve()
    static/       chat.html, the chat page served at /

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (the model's chat
template, see npgpt.sft), GET / (static/chat.html). Requests and responses follow OpenAI's
shapes, including server-sent events for `stream` (ending with `data: [DONE]`), logprobs and
usage; invalid values get a 400 with OpenAI's error body {"error": {message, type, param, code}}.
"""
