"""OpenAI-compatible HTTP server: protocol models, the app, prompt policies, limits and metrics.

Where things go: protocol.py (request bodies), errors.py (the error envelope), gate.py (auth, body
limit, draining), serving*.py (the endpoint pipelines), prompt_policy.py + summarizer.py, metrics.py,
app.py (routes), launcher.py (uvicorn), command.py (`tierlm serve`). Imports engine/ and below only;
importing this package does not import torch or FastAPI.
"""
