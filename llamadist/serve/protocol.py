"""The OpenAI API's request bodies, checked strictly: every field's type and range, no
unknown field (a typo must not be silently ignored), the body's size (its limit here,
enforced as app.read_body reads it). A bad request
becomes ``ApiError`` (HTTP status, a message naming the field and the limit, the field),
answered in the OpenAI error format; the server keeps serving.

Extensions beyond OpenAI's fields: ``top_k``, ``min_p``, ``repetition_penalty`` (the
multiplicative one, on prompt and output tokens), ``ignore_eos``."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, \
    ValidationError

MAX_BODY_BYTES = 4 << 20   # a larger body is refused (413) before it is parsed
MAX_N = 16                 # choices per request
MAX_STOP = 16              # stop strings per request
MAX_STOP_CHARS = 256       # characters per stop string
MAX_TOP_LOGPROBS = 20      # OpenAI's limit for chat (completions: 5; we allow 20 for both)
SEED_LIMIT = 2**63 - 1

Float = Annotated[float, Field(allow_inf_nan=False)]  # strict: ints yes, bools and strings no
StopText = Annotated[StrictStr, Field(max_length=MAX_STOP_CHARS)]


class ApiError(Exception):
    """An error answered to the client: ``status`` (4xx), ``message``, ``param``."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.status}}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    def check(self) -> None:
        """What the field types cannot say (a rule across fields): ApiError if broken."""


class StreamOptions(Strict):
    include_usage: StrictBool = False


class TextPart(Strict):
    type: Literal["text"]
    text: StrictStr


class Message(Strict):
    # "developer": OpenAI's newer name for the system turn (the template gets "system")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, list[TextPart], None] = None
    name: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class Sampling(Strict):
    """The fields chat and completions share."""
    model: StrictStr | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[Float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[Float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[StrictInt, Field(ge=-1, le=1 << 20)] = 0   # -1 and 0: off
    min_p: Annotated[Float, Field(ge=0.0, lt=1.0)] = 0.0
    repetition_penalty: Annotated[Float, Field(gt=0.0, le=10.0)] = 1.0
    presence_penalty: Annotated[Float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[Float, Field(ge=-2.0, le=2.0)] = 0.0
    seed: Annotated[StrictInt, Field(ge=-SEED_LIMIT, le=SEED_LIMIT)] | None = None
    stop: Union[StopText, Annotated[list[StopText], Field(max_length=MAX_STOP)], None] = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    max_tokens: Annotated[StrictInt, Field(ge=0, le=1 << 30)] | None = None
    ignore_eos: StrictBool = False
    user: Annotated[StrictStr, Field(max_length=256)] | None = None

    def check(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options: only with stream true", "stream_options")

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise ApiError(400, "stop: a stop string must not be empty", "stop")
        return tuple(stops)



class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1, le=1 << 30)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    def check(self) -> None:
        super().check()
        if self.max_tokens == 0:
            raise ApiError(400, "max_tokens: must be >= 1 for a chat completion", "max_tokens")
        # null content is an assistant's (OpenAI: a tool-call turn); a user or system
        # turn without it would be sent to the model as an empty message
        for i, m in enumerate(self.messages):
            if m.content is None and m.role != "assistant":
                raise ApiError(400, f"messages.{i}.content: a {m.role} message needs "
                               f"content (a string or a list of text parts)",
                               f"messages.{i}.content")

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    def num_logprobs(self) -> int | None:
        """None: no logprobs; k: the chosen token's and the top k."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


Prompt = Union[StrictStr, Annotated[list[StrictStr], Field(min_length=1, max_length=64)],
               Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]]


class CompletionRequest(Sampling):
    prompt: Prompt
    echo: StrictBool = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    suffix: None = None

    def check(self) -> None:
        super().check()
        if self.max_tokens == 0 and not self.echo:  # echo + max_tokens 0 scores a text
            raise ApiError(400, "max_tokens: 0 generates nothing; ask for >= 1, or send "
                                "echo true (with logprobs) to score the prompt", "max_tokens")

    def limit(self) -> int | None:
        return 16 if self.max_tokens is None else self.max_tokens  # OpenAI's default

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, str) for p in self.prompt):
            return list(self.prompt)
        return [list(self.prompt)]


# What a field of several accepted forms takes, said when a value matches none of them
UNION_FORMS = {
    "prompt": "a string, a list of 1 to 64 strings, or a list of token ids (integers >= 0)",
    "stop": f"a string or a list of at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} "
            f"characters",
    "content": 'a string or a list of text parts ({"type": "text", "text": "..."})',
}


def too_large(size: int | str) -> ApiError:
    return ApiError(413, f"body: {size} bytes, more than the limit of {MAX_BODY_BYTES}")


def _where(loc: tuple) -> str:
    return ".".join(str(part) for part in loc) or "body"


def _is_branch(part: object) -> bool:
    """Whether a location part is pydantic's name for a union's branch ("str",
    "constrained-str", "list[constrained-int]"), not a field the client wrote."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none") or
                                      "[" in part or part.startswith("constrained-"))


def _first_error(errors: list[dict]) -> tuple[str, str]:
    """(where, message) of a validation's first error. pydantic names a union's branch in
    the location ("prompt.list[constrained-int]"): left out here, and when the value
    matches no branch's type the message says which forms the field takes."""
    loc = errors[0]["loc"]
    tag = next((i for i, part in enumerate(loc) if i and _is_branch(part)), None)
    if tag is None:
        return _where(loc), errors[0]["msg"]
    field = tuple(loc[:tag])
    branches = [e for e in errors if tuple(e["loc"][:tag]) == field]
    # a branch of the right type whose value breaks a rule (too long, out of range) says more
    for e in branches:
        if not e["type"].endswith("_type"):
            kept = tuple(p for p in e["loc"] if not _is_branch(p))
            return _where(kept), e["msg"]
    forms = UNION_FORMS.get(str(field[-1]) if field else "", "another type of value")
    return _where(field), f"expected {forms}"


def _not_text(data: Any) -> str | None:
    """Where in a parsed body a string holds a lone surrogate (valid JSON, no Unicode text:
    the tokenizer cannot take it), or None. A walk without recursion: a body nests as
    deep as json.loads allows."""
    todo = [((), data)]
    while todo:
        loc, value = todo.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return _where(loc)
        elif isinstance(value, dict):  # a key too: an error naming it must encode
            for key, item in value.items():
                todo += [(loc + (key,), item), (loc, key)]
        elif isinstance(value, list):
            todo += [(loc + (i,), item) for i, item in enumerate(value)]
    return None


def parse(kind: type[Strict], body: bytes) -> Any:
    """The request object of ``body`` (app.read_body has held it to MAX_BODY_BYTES), or
    ApiError 400 naming the first bad field."""
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ApiError(400, f"body: not UTF-8 ({e.reason} at byte {e.start})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, a 5 000-digit integer
        raise ApiError(400, f"body: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"body: expected a JSON object, got {type(data).__name__}")
    where = _not_text(data)
    if where is not None:
        raise ApiError(400, f"{where}: holds a lone UTF-16 surrogate (an escape such as "
                            f"\\ud800 with no pair), which is no text; send valid Unicode",
                       where)
    try:
        request = kind.model_validate(data)
    except ValidationError as e:
        where, msg = _first_error(e.errors(include_url=False))
        raise ApiError(400, f"{where}: {msg}", where) from None
    request.check()
    return request
