"""/openapi.json describes every request and response body, and the real answers fit those descriptions (the
response models forbid fields they do not name, so a body that grows a field fails here until it is described)."""

import json

from server import schemas


def resolve(spec: dict, schema: dict) -> dict:
    ref = schema.get("$ref", "")
    assert ref.startswith("#/components/schemas/"), schema
    return spec["components"]["schemas"][ref.rsplit("/", 1)[1]]


def test_every_route_has_typed_bodies(client):
    spec = client.get("/openapi.json").json()
    routes = {(path, method): op for path, ops in spec["paths"].items() for method, op in ops.items()}
    assert {("/v1/completions", "post"), ("/v1/chat/completions", "post"), ("/tokenize", "post"),
            ("/detokenize", "post"), ("/tokenizer_info", "get"), ("/version", "get"), ("/v1/models/{model_id}", "get"),
            ("/v1/models", "get"), ("/health", "get"), ("/metrics", "get")} <= set(routes)
    for (path, method), op in routes.items():
        if method == "post":
            body = resolve(spec, op["requestBody"]["content"]["application/json"]["schema"])
            assert body["properties"], path
        ok = op["responses"]["200"]["content"]
        if path == "/metrics":
            assert list(ok) == ["text/plain"]
            continue
        answer = resolve(spec, ok["application/json"]["schema"])
        # (/invocations answers as the route its body goes to: one of their bodies)
        for body in [resolve(spec, form) for form in answer["anyOf"]] if "anyOf" in answer else [answer]:
            assert body["properties"], path
    invocation = resolve(spec, routes[("/invocations", "post")]["responses"]["200"]["content"]["application/json"]
                         ["schema"])
    assert {form["$ref"].rsplit("/", 1)[1] for form in invocation["anyOf"]} == {"Completion", "ChatCompletion",
                                                                                 "ResponseObject"}
    completion = resolve(spec, routes[("/v1/completions", "post")]["requestBody"]["content"]["application/json"]
                         ["schema"])
    assert {"prompt", "logit_bias", "min_tokens", "n", "scale_bucket"} <= set(completion["properties"])
    stream = routes[("/v1/chat/completions", "post")]["responses"]["200"]["content"]["text/event-stream"]
    assert resolve(spec, stream["schema"])["title"] == "ChatCompletionChunk"


def test_real_answers_fit_their_schemas(client):
    def post(path, **body):
        return client.post(path, json=body).json()

    schemas.Completion.model_validate(post("/v1/completions", prompt="the river", max_tokens=3, logprobs=2,
                                           echo=True))
    schemas.Completion.model_validate(post("/v1/completions", prompt=[[5, 6], [7, 8, 9]], n=2, max_tokens=2))
    with client.stream("POST", "/v1/completions", json={"prompt": "the river", "max_tokens": 3, "stream": True,
                                                        "stream_options": {"include_usage": True}}) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: {")]
    for event in events:
        schemas.Completion.model_validate(json.loads(event))
    schemas.ModelList.model_validate(client.get("/v1/models").json())
    schemas.ModelCard.model_validate(client.get("/v1/models/tiny").json())
    schemas.Tokenized.model_validate(post("/tokenize", prompt="the river", return_token_strs=True))
    schemas.Detokenized.model_validate(post("/detokenize", tokens=[5, 6]))
    schemas.TokenizerInfo.model_validate(client.get("/tokenizer_info").json())
    schemas.Version.model_validate(client.get("/version").json())
    schemas.Health.model_validate(client.get("/health").json())
    schemas.Invocation.model_validate(post("/invocations", prompt="the river", max_tokens=2))
    schemas.Error.model_validate(post("/v1/completions", prompt=""))
    schemas.Error.model_validate(post("/v1/chat/completions", messages=[{"role": "user", "content": "hi"}]))
