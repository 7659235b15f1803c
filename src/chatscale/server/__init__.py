"""The OpenAI-compatible HTTP server: thin HTTP <-> engine, one concept per module.

api (routes, `create_app`) · protocol (wire models) · generation (request -> engine requests) ·
completions (outputs -> OpenAI shapes) · logprobs · sse · errors · middleware (key, 429, 413) · disconnect ·
state · settings · main (`chatscale serve`, uvicorn, SIGTERM drain).
"""
