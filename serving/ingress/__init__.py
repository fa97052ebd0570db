"""Ingress: the OpenAI-compatible HTTP API and the request pipeline, in plain Python.

openai_api (request schemas, response objects), sse (event framing), auth
(API key -> tenant), pipeline (the stages), app (the ASGI app), metrics.
Ray adapters wrap these in serving/ray/; nothing here imports Ray.
"""
