"""Every error a client can see renders as valid OpenAI error JSON."""

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException

import models.errors
from models.errors import AligndError, ModelNotFoundError, OverloadedError
from server.errors import ClientDisconnectedError, InternalServerError, RouteError, as_aligned_error, error_payload
from server.protocol import ChatCompletionRequest, CompletionRequest


def all_error_classes() -> list[type[AligndError]]:
    found, pending = [], [AligndError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def instance(cls: type[AligndError]) -> AligndError:
    if cls is ModelNotFoundError:
        return cls("some-model")
    if cls is RouteError:
        return cls("Not Found", 404)
    if cls in (InternalServerError, ClientDisconnectedError):
        return cls()
    if issubclass(cls, OverloadedError):
        return cls("busy", retry_after_s=3)
    return cls("something went wrong", param="field")


@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda cls: cls.__name__)
def test_every_error_maps_to_openai_json(cls: type[AligndError]):
    error = instance(cls)
    body = error_payload(error)["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert isinstance(body["message"], str) and body["message"]
    assert isinstance(body["type"], str) and body["type"]
    assert 400 <= error.status_code < 600


def test_the_module_tree_lists_every_class():
    documented = models.errors.__doc__ or ""
    for cls in all_error_classes():
        if cls.__module__ == "models.errors":
            assert cls.__name__ in documented


def validation_error(model: type, body: dict) -> RequestValidationError:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    errors = [{**error, "loc": ("body", *error["loc"])} for error in info.value.errors()]
    return RequestValidationError(errors)


@pytest.mark.parametrize(
    ("model", "body", "param", "code"),
    [
        (CompletionRequest, {"model": "m"}, "prompt", "invalid_request"),
        (CompletionRequest, {"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens", "invalid_request"),
        (CompletionRequest, {"model": "m", "prompt": "x", "max_tokens": "ten"}, "max_tokens", "invalid_request"),
        (CompletionRequest, {"model": "m", "prompt": "x", "best_of": 3}, "best_of", "unsupported_parameter"),
        (CompletionRequest, {"model": "m", "prompt": ["a", "b"]}, "prompt", "unsupported_parameter"),
        (CompletionRequest, {"model": "m", "prompt": "x", "colour": 1}, "colour", "invalid_request"),
        (ChatCompletionRequest, {"model": "m", "messages": []}, "messages", "invalid_request"),
        (ChatCompletionRequest, {"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role",
         "invalid_request"),
        (ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{}]},
         "tools", "unsupported_parameter"),
    ],
)  # fmt: skip
def test_validation_errors_name_the_field(model: type, body: dict, param: str, code: str):
    error = as_aligned_error(validation_error(model, body))
    assert (error.status_code, error.param, error.code) == (400, param, code)
    assert param.split(".")[0] in error.message


def test_neutral_values_of_unsupported_parameters_are_accepted():
    request = CompletionRequest.model_validate(
        {"model": "m", "prompt": "x", "best_of": 1, "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}}
    )
    assert request.prompt == "x"


def test_framework_errors_are_converted():
    assert as_aligned_error(HTTPException(404, "Not Found")).status_code == 404
    unexpected = as_aligned_error(RuntimeError("secret detail"))
    assert unexpected.status_code == 500 and "secret" not in unexpected.message
