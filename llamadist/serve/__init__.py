"""The OpenAI-compatible HTTP server (``llamadist serve``): protocol (request checks),
openai_api (requests to engine requests), responses (OpenAI objects), metrics
(Prometheus), app (routes), server (the command), static/chat.html (the chat page)."""
