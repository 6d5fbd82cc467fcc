"""The HTTP routes: OpenAI completions, chat completions, responses and models; vLLM's tokenizer routes and
version; health; Prometheus metrics; SageMaker's /ping and /invocations, as vLLM serves them.

Routes stay thin: parse the body (pydantic), hand it to `CompletionService` (or `ChatService`,
`ResponsesService`), and shape the HTTP response.
Every ServerError raised below, and every HTTP fault Starlette raises (unknown route, wrong method), leaves
as OpenAI error JSON through the handlers here.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest

from runtime import __version__

from . import schemas
from .body_guard import BodyGuard
from .chat import ChatService
from .components import Components
from .config import ServerConfig
from .engine_pool import Engines
from .errors import AuthenticationError, InvalidRequestError, ResponseNotFoundError, ServerError, UnavailableError
from .event_stream import EventStream
from .protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, InvocationRequest, ResponsesRequest,
                       SamplingFields, TokenizeRequest, parse_body)
from .request_id import RequestIdMiddleware
from .responses import ResponsesService
from .serving import CompletionService, Submission, UsageChunks

HTTP_ERROR_TYPES = {404: "not_found_error", 405: "invalid_request_error"}


def error_response(error: ServerError) -> JSONResponse:
    return JSONResponse(error.to_json(), status_code=error.status, headers=error.headers())


# The bodies the routes parse themselves (strictly, into OpenAI errors), so FastAPI does not see them: the
# schema names them through `body_of`, and `_openapi` adds them (and the chunks of chat streams) to its components.
REQUEST_BODIES = (CompletionRequest, ChatCompletionRequest, ResponsesRequest, TokenizeRequest, DetokenizeRequest,
                  InvocationRequest)
ERROR_STATUSES = {400: "invalid request", 401: "missing or wrong API key", 404: "unknown model or route",
                  408: "the body came too slowly", 413: "body or prompt too large", 429: "queue full (Retry-After)",
                  503: "shutting down, stopped, or past --request-timeout"}


def body_of(model: type[BaseModel]) -> dict:
    """A route's openapi_extra naming `model` as its JSON request body."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def answers(model: type[BaseModel], streamed: type[BaseModel] | bool = False) -> dict:
    """A route's responses: `model` as JSON, with `stream` each event's schema (`streamed`, or `model` when
    True), and the errors."""
    ok: dict = {"model": model, "description": model.__doc__ or model.__name__}
    if streamed:
        event = model if streamed is True else streamed
        ok["content"] = {"text/event-stream": {"schema": {"$ref": f"#/components/schemas/{event.__name__}"}}}
    return {200: ok, **{status: {"model": schemas.Error, "description": what} for status, what in
                        ERROR_STATUSES.items()}}


def _openapi(app: FastAPI) -> dict:
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (*REQUEST_BODIES, schemas.ChatCompletionChunk, schemas.ResponseStreamEvent):
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
    app.openapi_schema = schema
    return schema


def usage_chunks(body: SamplingFields) -> UsageChunks:
    """Where the stream reports usage: vLLM's continuous_usage_stats only with include_usage, as vLLM reads it."""
    options = body.stream_options
    final = options is not None and options.include_usage
    return UsageChunks(final, final and options is not None and options.continuous_usage_stats)


def build_app(config: ServerConfig, components: Components, engine: Engines) -> FastAPI:
    """One app per engine (started, its model loaded and warmed up): the engine stops with the app's lifespan."""
    service = CompletionService(engine, components, config.http, engine.config)  # its slots sized
    chat = ChatService(service, components.tokenizer_config)
    responses = ResponsesService(chat)
    http = config.http

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="mamba-extend-server", version=__version__, lifespan=lifespan)
    # FastAPI's documented way to customise the schema, which its method type does not allow for
    app.openapi = lambda: app.openapi_schema or _openapi(app)  # type: ignore[method-assign]
    app.add_middleware(BodyGuard, max_bytes=http.max_body_bytes, timeout=http.body_timeout)
    if http.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(http.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["X-Request-Id"])
    app.add_middleware(RequestIdMiddleware)  # outermost: every answer carries the id, CORS preflights too
    app.state.engine = engine

    def model_card() -> dict:
        model, bank = components.model, components.bank
        buckets = [] if bank is None else [{"name": e.bucket, "length": e.length, "method": e.method,
                                            "granularity": e.granularity} for e in bank.manifest.entries]
        return {"id": http.served_model_name, "object": "model", "created": int(time.time()),
                "owned_by": "mamba-extend-server", "root": str(model.path), "arch": model.config.arch,
                "quantization": model.quantization, "max_model_len": http.max_context,
                "training_context_length": components.training_length, "scale_buckets": buckets}

    async def respond(shaper: CompletionService | ChatService, submission: Submission, body: SamplingFields,
                      request: HttpRequest) -> Response:
        """The stream of `submission` as server-sent events, or its whole object (499: the client left first)."""
        if body.stream:
            return EventStream(shaper.stream(submission, usage_chunks(body)), ping=http.heartbeat, sep="\n")
        completion = await shaper.complete(submission, request)
        return JSONResponse(completion) if completion is not None else Response(status_code=499)

    async def require_key(request: HttpRequest) -> None:
        # async, so that FastAPI runs it on the event loop: a plain function would take every request through a
        # worker thread and back
        if http.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {http.api_key}".encode()):
            raise AuthenticationError("missing or wrong API key: send 'Authorization: Bearer <key>'")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])
    keyed = APIRouter(dependencies=[Depends(require_key)])  # vLLM's routes outside /v1 that do model work

    @v1.post("/completions", openapi_extra=body_of(CompletionRequest),
             responses=answers(schemas.Completion, streamed=True))
    async def completions(request: HttpRequest) -> Response:
        body = parse_body(CompletionRequest, await request.body())
        prompts = await service.prompts(body.prompt, body.truncate_prompt_tokens)
        submission = await service.submit(body, prompts, request.state.request_id, echo=body.echo,
                                          logprobs=body.logprobs, prompt_logprobs=body.prompt_logprobs)
        return await respond(service, submission, body, request)

    @v1.post("/chat/completions", openapi_extra=body_of(ChatCompletionRequest),
             responses=answers(schemas.ChatCompletion, streamed=schemas.ChatCompletionChunk))
    async def chat_completions(request: HttpRequest) -> Response:
        body = parse_body(ChatCompletionRequest, await request.body())
        return await respond(chat, await chat.submit(body, request.state.request_id), body, request)

    @v1.post("/responses", openapi_extra=body_of(ResponsesRequest),
             responses=answers(schemas.ResponseObject, streamed=schemas.ResponseStreamEvent))
    async def create_response(request: HttpRequest) -> Response:
        body = parse_body(ResponsesRequest, await request.body())
        submission = await responses.submit(body, request.state.request_id)
        if body.stream:
            return EventStream(responses.stream(body, submission), ping=http.heartbeat, sep="\n")
        response = await responses.complete(body, submission, request)
        return JSONResponse(response) if response is not None else Response(status_code=499)

    @v1.get("/responses/{response_id}", responses=answers(schemas.Error))
    async def stored_response(response_id: str) -> Response:
        raise ResponseNotFoundError(f"response {response_id!r} is not stored: this server stores no responses (send "
                                    "the whole conversation as input)", param="response_id")

    @v1.get("/models", responses=answers(schemas.ModelList))
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{model_id:path}", responses=answers(schemas.ModelCard))
    async def model(model_id: str) -> dict:
        service.check_model(model_id)
        return model_card()

    @keyed.post("/invocations", openapi_extra=body_of(InvocationRequest), responses=answers(schemas.Invocation))
    async def invocations(request: HttpRequest) -> Response:
        """SageMaker's inference route: the body goes to the generation route whose body it is."""
        given = parse_body(InvocationRequest, await request.body()).model_fields_set
        for field, route in (("messages", chat_completions), ("prompt", completions), ("input", create_response)):
            if field in given:
                return await route(request)  # which reads the body again (Starlette keeps it)
        raise InvalidRequestError("an invocation is the body of chat completions ('messages'), completions ('prompt') "
                                  "or responses ('input'): it has none of them", param="messages")

    @keyed.post("/tokenize", openapi_extra=body_of(TokenizeRequest), responses=answers(schemas.Tokenized))
    async def tokenize(request: HttpRequest) -> dict:
        body = parse_body(TokenizeRequest, await request.body())
        service.check_model(body.model)
        if body.prompt is not None and body.messages is None:
            text = body.prompt
        elif body.messages is not None and body.prompt is None:
            text = chat.render(body.messages, body.add_generation_prompt,
                               continue_final_message=body.continue_final_message)
        else:
            raise InvalidRequestError("give either prompt or messages", param="prompt")
        [ids] = await asyncio.to_thread(components.tokenizer.encode_batch, [text])
        out = {"count": len(ids), "max_model_len": http.max_context, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = [components.tokenizer.id_to_token(i) for i in ids]
        return out

    @keyed.post("/detokenize", openapi_extra=body_of(DetokenizeRequest), responses=answers(schemas.Detokenized))
    async def detokenize(request: HttpRequest) -> dict:
        body = parse_body(DetokenizeRequest, await request.body())
        service.check_model(body.model)
        return {"prompt": components.tokenizer.decode(service.token_ids(body.tokens, "tokens"))}

    @keyed.get("/tokenizer_info", responses=answers(schemas.TokenizerInfo))
    async def tokenizer_info() -> dict:
        """What lm-evaluation-harness's remote tokenizer reads: the special tokens and the chat template."""
        tokenizer_config = components.tokenizer_config
        template = tokenizer_config.chat_template
        return {"tokenizer_class": "PreTrainedTokenizerFast", **tokenizer_config.special_tokens,
                "chat_template": None if template is None else template.source,
                "model_max_length": http.max_context, "vocab_size": components.tokenizer.vocab_size}

    app.include_router(v1)
    app.include_router(keyed)

    @app.get("/version", responses=answers(schemas.Version))
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/health", responses=answers(schemas.Health))
    @app.get("/ping", responses=answers(schemas.Health))  # SageMaker's health check (GET, and POST below)
    @app.post("/ping", include_in_schema=False)
    async def health() -> Response:
        if not engine.alive:
            return error_response(UnavailableError("the engine is not running"))
        if not engine.accepting:  # a graceful shutdown: load balancers should send no more
            return error_response(UnavailableError("the server is shutting down", code="shutting_down"))
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=PlainTextResponse, responses={200: {"description": "Prometheus text format"}})
    async def prometheus() -> Response:
        return Response(await engine.metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.exception_handler(ServerError)
    async def on_server_error(_request: HttpRequest, error: ServerError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def on_http_error(_request: HttpRequest, error: HTTPException) -> JSONResponse:
        body = {"error": {"message": str(error.detail), "type": HTTP_ERROR_TYPES.get(error.status_code, "server_error"),
                          "param": None, "code": None}}
        return JSONResponse(body, status_code=error.status_code, headers=error.headers)

    return app
