"""The generation server: OpenAI-compatible completions over the Mamba runtime, with a scale
bucket chosen per request. Layers in request order: app (HTTP routes) → serving (validation, bucket choice,
response shapes) → engine (the model's thread) → scheduler (which work each step does) → runtime model."""
