"""The OpenAI-compatible HTTP API over one AsyncEngine: routes only, each a thin hop to the engine.

`create_app(engine, settings)` builds it; `chatscale serve` (server/main.py) runs it with uvicorn.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from chatscale.engine.async_engine import AsyncEngine
from chatscale.metrics import CONTENT_TYPE, Metrics
from chatscale.server.chat_prompt import chat_prompt_ids, request_prompt_ids, tool_setup
from chatscale.server.completions import chat_completion, chat_stream, collect, text_completion, text_stream
from chatscale.server.dashboard import History
from chatscale.server.dashboard import router as dashboard_router
from chatscale.server.disconnect import cancel_on_disconnect
from chatscale.server.errors import ERROR_RESPONSES, APIError, install_error_handlers
from chatscale.server.generation import outputs, prepare
from chatscale.server.middleware import GateMiddleware
from chatscale.server.pages import STATIC, page
from chatscale.server.protocol import (
    ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, DetokenizeRequest, DetokenizeResponse,
    Health, Model, ModelList, TokenizeRequest, TokenizeResponse,
)
from chatscale.server.settings import ServerSettings
from chatscale.server.sse import SSEResponse
from chatscale.server.state import ServerState
from chatscale.server.structured import grammar_for, unsupported_fields

log = logging.getLogger("chatscale.server")
router = APIRouter()
STREAMS = {200: {"content": {"text/event-stream": {}}, "description": "the response, or its SSE stream"}}


def create_app(engine: AsyncEngine | Callable[[], AsyncEngine], settings: ServerSettings,
               on_ready: Callable[[], None] | None = None) -> FastAPI:
    """`engine` is a running engine (its owner shuts it down), or a function that loads one: it runs
    in a thread at startup while /health answers 503 "loading", and the app shuts it down at exit.
    `on_ready` is called once a loaded engine serves (what `chatscale serve` announces)."""
    state = ServerState(settings, Metrics(settings.served_model_name))
    state.engine = engine if isinstance(engine, AsyncEngine) else None
    if state.engine is not None:
        state.metrics.attach(state.engine.info, state.engine.step_listeners)
    history = History()  # the dashboard's last ten minutes

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        state.drain_cut = asyncio.Event()
        sampler = asyncio.create_task(history.run(state))
        loading = None if state.engine is not None else asyncio.create_task(_load(state, engine, on_ready))
        try:
            yield
        finally:
            sampler.cancel()
            if loading is not None:
                await loading
                if state.engine is not None:
                    state.engine.shutdown()

    app = FastAPI(title="chatscale", summary="OpenAI-compatible API over the chatscale engine", version="1",
                  lifespan=lifespan, docs_url=None, redoc_url=None, responses=ERROR_RESPONSES)
    app.state.server = state
    app.state.history = history
    app.state.created = int(time.time())
    install_error_handlers(app)
    app.add_middleware(GateMiddleware, state=state)
    app.include_router(router)
    app.include_router(dashboard_router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")  # the chat page's files
    return app


async def _load(state: ServerState, loader: Callable[[], AsyncEngine],
                on_ready: Callable[[], None] | None) -> None:
    try:
        state.engine = await asyncio.to_thread(_load_and_attach, state, loader)
    except Exception as exc:
        state.load_error = f"{type(exc).__name__}: {exc}"
        log.exception("loading the model failed")
        return
    if on_ready is not None:
        on_ready()


def _load_and_attach(state: ServerState, loader: Callable[[], AsyncEngine]) -> AsyncEngine:
    """Start the engine process, wait until its model is loaded, and start its metrics."""
    engine = loader()
    state.metrics.attach(engine.info, engine.step_listeners)
    return engine


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.settings.served_model_name:
        raise APIError(404, f"The model `{model}` does not exist or you do not have access to it.",
                       param="model", code="model_not_found")


@router.get("/", include_in_schema=False)
async def chat_page() -> FileResponse:
    return page("index.html")


@router.get("/health", response_model=Health, responses={503: {"model": Health, "description": "not ready"}})
async def health(request: Request) -> JSONResponse:
    """200 when requests can be served; 503 while loading, draining or after the engine failed."""
    state = _state(request)
    body = Health(status=state.status, error=state.error)
    return JSONResponse(body.model_dump(exclude_none=True), 200 if body.status == "ok" else 503)


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_model_card(request)])


@router.get("/v1/models/{model_id:path}", response_model=Model)
async def get_model(model_id: str, request: Request) -> Model:
    _check_model(_state(request), model_id)
    return _model_card(request)


def _model_card(request: Request) -> Model:
    state = _state(request)
    return Model(id=state.settings.served_model_name, created=request.app.state.created,
                 max_model_len=state.ready_engine().max_model_len)


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus exposition: engine load gauges read now, token counters since start."""
    state = _state(request)
    state.observe_engine()
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    state = _state(request)
    core = state.ready_engine()
    _check_model(state, body.model)
    given = {"prompt", "messages"} & body.model_fields_set
    if len(given) != 1 or (body.prompt is None and body.messages is None):  # as the schema's oneOf says
        raise APIError(400, "Send exactly one of 'prompt' or 'messages', not null.", param="prompt")
    if body.messages is not None:
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        ids = chat_prompt_ids(core.tokenizer, body.messages, body.add_generation_prompt, tools,
                              body.chat_template_kwargs)
    else:
        ids = core.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return TokenizeResponse(count=len(ids), max_model_len=core.max_model_len, tokens=ids)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    state = _state(request)
    core = state.ready_engine()
    _check_model(state, body.model)
    bad = [t for t in body.tokens if not 0 <= t < core.vocab_size]
    if bad:
        raise APIError(400, f"Token id {bad[0]} is outside the vocabulary [0, {core.vocab_size}).", param="tokens")
    return DetokenizeResponse(prompt=core.tokenizer.decode(body.tokens))


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=STREAMS)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> ChatCompletion | SSEResponse:
    state = _state(request)
    engine = state.ready_engine()
    _check_model(state, body.model)
    request.state.hold.take(1, body.n)
    tokenizer = engine.tokenizer
    unsupported_fields(body)
    tools = tool_setup(body, tokenizer, state.settings.tool_call_parser)
    grammar = grammar_for(body)
    if tools.grammar is not None and (grammar is None or body.tool_choice not in (None, "auto")):
        grammar = tools.grammar  # a response_format wins over "auto": the answer is then no call
    ids = request_prompt_ids(tokenizer, body, tools)
    gen = prepare(engine, "chatcmpl", state.settings.served_model_name, [ids],
                  {**body.sampling_overrides(), "structured": grammar}, prompt_param="messages",
                  cache_salt=body.cache_salt)
    gen.tool_parser = tools.parser
    outs = outputs(engine, gen, state.metrics, state.drain_cut)
    if body.stream:
        return SSEResponse(chat_stream(gen, outs, tokenizer, body.include_usage or state.settings.always_include_usage))
    return chat_completion(gen, await cancel_on_disconnect(request, collect(outs)), tokenizer)


@router.post("/v1/completions", response_model=Completion, responses=STREAMS)
async def completions(body: CompletionRequest, request: Request) -> Completion | SSEResponse:
    state = _state(request)
    engine = state.ready_engine()
    _check_model(state, body.model)
    unsupported_fields(body)
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo with logprobs is not supported: prompt tokens get no logprobs here.", param="echo")
    prompts = body.prompts()
    request.state.hold.take(len(prompts), body.n)
    gen = prepare(engine, "cmpl", state.settings.served_model_name, prompts,
                  {**body.sampling_overrides(), "structured": grammar_for(body)}, prompt_param="prompt",
                  cache_salt=body.cache_salt)
    tokenizer = engine.tokenizer
    if body.echo:
        gen.echo = [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts]
    outs = outputs(engine, gen, state.metrics, state.drain_cut)
    if body.stream:
        return SSEResponse(text_stream(gen, outs, tokenizer, body.include_usage or state.settings.always_include_usage))
    return text_completion(gen, await cancel_on_disconnect(request, collect(outs)), tokenizer)
