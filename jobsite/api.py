"""The JSON API: /api/v1/, OpenAPI at /api/docs. Reads need a login; each write needs its
action's permission (jobsite.permissions.require, in the endpoint).

A client is a person's browser session (writes carry the CSRF token) or a script with a personal
API token (`Authorization: Bearer <key>`, no CSRF token: a browser never sends that header by
itself); either way the request acts as its user, with that user's permissions. The apps' routers
are mounted by the URL conf (jobsite/urls.py): they import this module, never the other way.

Every refusal is a 4xx with a `message` sentence that says what to change; a 422 about one
input also names it in `field`.
"""

import pydantic
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, JsonResponse
from ninja import Field, NinjaAPI, Schema, Status
from ninja.errors import AuthenticationError, HttpError, ValidationError
from ninja.security import HttpBearer, SessionAuth
from pydantic import ConfigDict, model_validator
from pydantic_core import PydanticCustomError

from jobsite.errors import JobInputError, counted
from jobsite.lifecycle import TransitionError
from jobsite.tokens import TokenRefused, api_token_user


class Message(Schema):
    message: str


class Refusal(Message):
    field: str | None = Field(None, description="the input the message is about, when it is about one")


class Input(Schema):
    """A request body. A field it does not have is refused, never dropped: a misspelled
    optional field would otherwise silently mean its default (`pairs` for `pair_ids`: every
    pending pair). Values are taken as JSON types them, never converted: `[true]` is not the
    layer list [1], nor "yes" true, nor "1" the id 1."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="wrap")
    @classmethod
    def _unknown_fields_name_the_fields(cls, data, handler):
        try:
            return handler(data)
        except pydantic.ValidationError as exc:
            unknown = [error for error in exc.errors() if error["type"] == "extra_forbidden"]
            if not unknown:
                raise
            fields = _listed(list(cls.model_fields))
            # First: a misspelled field is also a "missing" one, and the misspelling is what to fix.
            raise pydantic.ValidationError.from_exception_data(exc.title, [
                {**error, "type": PydanticCustomError(
                    "extra_forbidden",
                    "Unknown field '{name}'; the fields are {fields}." if i == 0 else "Unknown field '{name}'.",
                    {"name": str(error["loc"][-1]), "fields": fields},
                )} for i, error in enumerate(unknown)
            ] + [error for error in exc.errors() if error["type"] != "extra_forbidden"]) from None


class JobOut(Schema):
    """What every job's answer says of its worker, so that a client need not work it out."""

    heartbeat_age_s: float | None = Field(
        description="seconds since its worker's last heartbeat; null when no worker holds it")
    is_stalled: bool = Field(
        description="running, but its worker silent past JOBSITE_STALL_AFTER_S: Resume takes it back at once, "
                    "the watchdog on its next pass")


def refuse_unknown_form_fields(request, *fields: str) -> None:
    """A multipart upload's fields, checked as a JSON body's are: one the endpoint does not
    take is refused, never dropped."""
    unknown = [name for name in [*request.POST, *request.FILES] if name not in fields]
    if unknown:
        raise JobInputError(f"Unknown field '{unknown[0]}'; the fields are {_listed(list(fields))}.",
                            field=unknown[0])


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


CSRF_SENTENCE = ("The CSRF token is missing or wrong: send the csrftoken cookie's value in an X-CSRFToken "
                 "header with every write.")


MALFORMED_AUTHORIZATION = ("The Authorization header is not understood: send 'Authorization: Bearer <key>' with "
                           "a personal API token, or no Authorization header with a session cookie.")


class TokenRejected(HttpError):
    """A 401 for a request that sent a token (or tried to): never answered by the session instead."""

    def __init__(self, message: str):
        super().__init__(401, message)


class BearerToken(HttpBearer):
    """A personal API token (jobsite.tokens): the request acts as the token's user.

    Listed before the session: a request with an Authorization header is decided here. A bad
    header, an unknown or revoked key, or a deactivated account is refused with a 401 sentence,
    never passed on to a session cookie the same client may also hold.
    """

    openapi_description = ("A personal API token, sent as 'Authorization: Bearer <key>'. Create one with "
                           "manage.py jobs token create USER or in the admin (API tokens). No CSRF token needed.")

    def __call__(self, request: HttpRequest):
        header = request.headers.get(self.header)
        if header is None:
            return None
        scheme, _, key = header.strip().partition(" ")
        key = key.strip()
        if scheme.lower() != self.openapi_scheme or not key or " " in key:
            raise TokenRejected(MALFORMED_AUTHORIZATION)
        return self.authenticate(request, key)

    def authenticate(self, request: HttpRequest, token: str):
        try:
            user = api_token_user(key=token)
        except TokenRefused as exc:
            raise TokenRejected(str(exc)) from None
        # Permission checks read request.user, as they do for a session.
        request.user = user
        return user


class LoginRequired(SessionAuth):
    """Session login (with CSRF on writes from the browser). Without a login the answer is
    'log in first' (401), not the CSRF refusal that ninja's check would give before it."""

    openapi_description = ("The session cookie of a login at /accounts/login/; a write also sends the csrftoken "
                           "cookie's value in an X-CSRFToken header.")

    def __call__(self, request: HttpRequest):
        if not request.user.is_authenticated:
            return None
        return super().__call__(request)

    def _get_key(self, request: HttpRequest):
        try:
            return super()._get_key(request)
        except HttpError as exc:  # ninja's own sentence is "CSRF check Failed"
            raise HttpError(403, CSRF_SENTENCE) from exc


# Token first (see BearerToken); the API's default, so every endpoint takes either.
login_required = [BearerToken(), LoginRequired()]


class JobsiteAPI(NinjaAPI):
    def validation_error_from_error_contexts(self, error_contexts) -> ValidationError:
        """ninja's, keeping a refused value when it is a short scalar: "not '0,2'" tells the
        client what it sent (ninja drops every input, so as not to echo whole bodies)."""
        errors = []
        for context in error_contexts:
            model = context.model
            for error in context.pydantic_validation_error.errors(include_url=False):
                value = error.pop("input", None)
                error["loc"] = (model.__ninja_param_source__,) + model.__ninja_flatten_map_reverse__.get(
                    error["loc"], error["loc"])
                if isinstance(value, (str, int, float)) and not isinstance(value, bool) and len(str(value)) <= 100:
                    error["input"] = value
                if isinstance((error.get("ctx") or {}).get("error"), Exception):
                    error["ctx"]["error"] = str(error["ctx"]["error"])
                errors.append(dict(error))
        return ValidationError(errors)


api = JobsiteAPI(title="jobsite", version="1", urls_namespace="api", docs_url="/docs", auth=login_required)


_SOURCES = ("body", "query", "path", "header", "cookie", "form", "file")


def _location(loc) -> str:
    """The field a validation error is about: ("query", "k") -> "k", ("body", "payload", "layers", 0) ->
    "layers.0" (the body's own parameter name means nothing to a client)."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in _SOURCES:
        if parts.pop(0) == "body" and parts:
            parts.pop(0)
    return ".".join(parts)


def _subject(loc) -> str:
    """What a phrase is about: "layers", "item 2 of layers" (an item of a list), "" for the body."""
    parts = _location(loc).split(".") if loc else []
    if len(parts) > 1 and parts[-1].isdigit():
        return f"item {int(parts[-1]) + 1} of {'.'.join(parts[:-1])}"
    return ".".join(parts)


def _got(error: dict) -> str:
    value = error.get("input")
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        return f", not {shown}"
    return ""


def _phrase(error: dict) -> str:
    """One validation error as a person says it: "layers must be a list, e.g. [0, 2], not '0,2'"."""
    kind, ctx = error.get("type", ""), error.get("ctx") or {}
    message = str(error.get("msg", "is invalid")).removeprefix("Value error, ")
    subject, got = _subject(error.get("loc", ())), _got(error)
    if kind == "missing" and not subject:
        return "The request needs a JSON object as its body, e.g. {...}; see /api/v1/docs"
    if kind in ("value_error", "extra_forbidden", "assertion_error") or not subject:
        return message  # our own sentences (they name what they are about)
    phrases = {
        "missing": "is required",
        "int_parsing": f"must be a whole number{got}", "int_type": f"must be a whole number{got}",
        "int_from_float": f"must be a whole number{got}",
        "float_parsing": f"must be a number{got}", "float_type": f"must be a number{got}",
        "bool_parsing": f"must be true or false{got}", "bool_type": f"must be true or false{got}",
        "string_type": f"must be text in quotes{got}",
        "list_type": f"must be a list, e.g. [0, 2]{got}",
        "dict_type": "must be an object, e.g. {...}",
        "too_short": f"needs at least {counted(ctx.get('min_length', 1), 'item')}",
        "too_long": f"takes at most {counted(ctx.get('max_length', 0), 'item')}",
        "string_too_short": f"needs at least {counted(ctx.get('min_length', 1), 'character')}",
        "string_too_long": f"takes at most {counted(ctx.get('max_length', 0), 'character')}",
        "greater_than": f"must be greater than {ctx.get('gt')}{got}",
        "greater_than_equal": f"must be at least {ctx.get('ge')}{got}",
        "less_than": f"must be less than {ctx.get('lt')}{got}",
        "less_than_equal": f"must be at most {ctx.get('le')}{got}",
        "literal_error": f"must be {ctx.get('expected')}{got}",
        "enum": f"must be {ctx.get('expected')}{got}",
    }
    return f"{subject} {phrases.get(kind) or message.replace('Input should be', 'must be')}"


def _sentence_for(errors: list[dict]) -> str:
    parts = [_phrase(error).removesuffix(".") for error in errors]
    # "; " joins them as one sentence, which ends with one full stop.
    return ("; ".join(parts) + ".") if parts else "The request is invalid."


@api.exception_handler(ValidationError)
def on_validation_error(request, exc: ValidationError):
    field = _location(exc.errors[0].get("loc", ())).split(".")[0] if exc.errors else ""  # the input, not its item
    return api.create_response(request, {"message": _sentence_for(exc.errors), "field": field or None,
                                         "detail": exc.errors}, status=422)


@api.exception_handler(JobInputError)
def on_job_input_error(request, exc: JobInputError):
    return api.create_response(request, {"message": str(exc), "field": exc.field}, status=422)


@api.exception_handler(TransitionError)
def on_transition_error(request, exc: TransitionError):
    return api.create_response(request, {"message": str(exc)}, status=409)


@api.exception_handler(TokenRejected)
def on_token_rejected(request, exc: TokenRejected):
    response = api.create_response(request, {"message": str(exc)}, status=401)
    response["WWW-Authenticate"] = 'Bearer error="invalid_token"'
    return response


@api.exception_handler(PermissionDenied)
def on_permission_denied(request, exc: PermissionDenied):
    """A service's own check (jobsite.permissions.check) said no: 403 with its sentence."""
    return api.create_response(request, {"message": str(exc) or "You may not do this."}, status=403)


LOG_IN_FIRST = "Log in first (session cookie), or send a personal API token as 'Authorization: Bearer <key>'."


@api.exception_handler(AuthenticationError)
def on_authentication_error(request, exc):
    return api.create_response(request, {"message": LOG_IN_FIRST}, status=401)


NOT_JSON = "The request body is not JSON: send a JSON object, e.g. {...}, with Content-Type: application/json."


@api.exception_handler(HttpError)
def on_http_error(request, exc: HttpError):
    message = str(exc)
    if message.startswith("Cannot parse request body"):  # ninja's own words for a body that is not JSON
        message = NOT_JSON
    return api.create_response(request, {"message": message}, status=exc.status_code)


def json_refusals(get_response):
    """Middleware: the refusals Django answers itself under /api/v1/ (a path no endpoint
    answers, a method an endpoint does not take) as JSON sentences, like the API's own."""

    def middleware(request):
        response = get_response(request)
        if (not request.path.startswith("/api/v1/") or not 400 <= response.status_code < 500
                or response.get("Content-Type", "").startswith("application/json")):
            return response
        if response.status_code == 404:
            message = f"No API endpoint at {request.path}; the endpoints are listed at /api/v1/docs."
        elif response.status_code == 405:
            message = f"{request.method} is not allowed on {request.path}; it takes {response.get('Allow', '')}."
        else:
            message = f"{response.reason_phrase}."
        refusal = JsonResponse({"message": message}, status=response.status_code)
        if response.has_header("Allow"):
            refusal["Allow"] = response["Allow"]
        return refusal

    return middleware


class HealthOut(Schema):
    healthy: bool
    failing: list[str]
    parts: dict


@api.get("/health", auth=None, response={200: HealthOut, 503: HealthOut}, tags=["operations"])
def health(request):
    """Database, broker, channel layer, live workers, queue depth, stalled jobs: 503 names what fails."""
    from jobsite.health import health as check

    healthy, parts = check()
    body = {"healthy": healthy, "failing": [name for name, part in parts.items() if not part["ok"]], "parts": parts}
    return Status(200 if healthy else 503, body)
