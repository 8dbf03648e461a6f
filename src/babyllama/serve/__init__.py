"""`babyllama serve`: an OpenAI-compatible HTTP server for a run, with continuous batching.

    worker.py    the engine thread that owns the model (infer/scheduler.py does the batching)
    protocol.py  OpenAI's request bodies, validated, and its error object
    app.py       the FastAPI app: endpoints, SSE streams, API key and body-size gate
    chat.html    the chat page served at /
    client.py    a chat session with a running server (`babyllama chat --server`; stdlib only)
"""
