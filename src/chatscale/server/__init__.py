"""The OpenAI-compatible HTTP server: thin HTTP <-> engine, one concept per module.

api (routes, `create_app`) · protocol (wire models) · generation (request -> engine requests) ·
completions (outputs -> OpenAI shapes) · logprobs · sse · errors · middleware (key 401, body 413/408) ·
admission (sequences: caps 400, slots 429) · disconnect · state · settings · main (`chatscale serve`,
uvicorn, SIGTERM drain).
"""
