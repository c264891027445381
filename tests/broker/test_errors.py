"""One error tree: stable codes, mapped back to classes, carried by structured replies."""

from __future__ import annotations

import msgspec
import pytest

import broker.errors as errors_module
from broker.errors import (
    BadRequest,
    CallDenied,
    CallError,
    CallTimeout,
    InvalidInput,
    NotFound,
    RemoteError,
    SchemaError,
    SignalboxError,
    UnknownTarget,
    code_to_error,
)
from broker.replies import H_ERROR, error_from_reply, error_reply, is_error
from schemas import ErrorReply


def _tree() -> list[type[SignalboxError]]:
    out: list[type[SignalboxError]] = []
    todo: list[type[SignalboxError]] = [SignalboxError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out


ALL = [c for c in _tree() if c.__module__ == "broker.errors"]


def test_every_error_class_has_a_unique_code() -> None:
    codes = [c.code for c in ALL]
    assert len(codes) == len(set(codes)), codes


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_code_to_error_maps_every_code_back_to_its_class(cls: type[SignalboxError]) -> None:
    err = code_to_error(cls.code, "m", {"k": 1})
    assert type(err) is cls
    assert err.message == "m"
    assert err.details == {"k": 1}


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_every_error_class_is_exported_and_drawn_in_the_docstring(
    cls: type[SignalboxError],
) -> None:
    assert cls.__name__ in errors_module.__all__
    assert errors_module.__doc__ is not None
    assert cls.__name__ in errors_module.__doc__
    assert f'"{cls.code}"' in errors_module.__doc__


def test_unknown_codes_become_remote_errors_keeping_the_code() -> None:
    err = code_to_error("quota_exceeded", "over quota", {"limit": 3})
    assert type(err) is RemoteError
    assert isinstance(err, CallError)
    assert err.details == {"limit": 3, "code": "quota_exceeded"}


def test_call_errors_are_also_the_matching_builtin_exceptions() -> None:
    assert issubclass(CallDenied, PermissionError)
    assert issubclass(CallTimeout, TimeoutError)
    assert issubclass(UnknownTarget, LookupError)
    assert issubclass(NotFound, LookupError)
    assert issubclass(BadRequest, ValueError)
    assert issubclass(SchemaError, InvalidInput)


def test_details_are_copied_not_shared() -> None:
    details = {"a": 1}
    err = SignalboxError("m", details=details)
    details["a"] = 2
    assert err.details == {"a": 1}
    assert repr(err) == "SignalboxError('m', details={'a': 1})"
    assert str(err) == "m"


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_error_reply_round_trips_to_the_same_typed_error(cls: type[SignalboxError]) -> None:
    body, headers = error_reply(cls("what went wrong", details={"path": "$.x", "n": [1, 2]}))
    assert headers == {H_ERROR: cls.code}
    assert is_error(headers)
    assert msgspec.json.decode(body)["type"] == "error.v1"
    err = error_from_reply(body, headers)
    assert type(err) is cls
    assert err.message == "what went wrong"
    assert err.details == {"path": "$.x", "n": [1, 2]}


def test_error_reply_accepts_a_prebuilt_reply() -> None:
    body, headers = error_reply(ErrorReply(code="denied", message="no", details={"x": 1}))
    assert headers == {H_ERROR: "denied"}
    err = error_from_reply(body, headers)
    assert isinstance(err, CallDenied)
    assert err.details == {"x": 1}


@pytest.mark.parametrize("headers", [None, {}, {"Other": "x"}])
def test_replies_without_the_error_header_are_not_errors(
    headers: dict[str, str] | None,
) -> None:
    assert not is_error(headers)


def test_an_unreadable_error_body_still_yields_the_headers_code() -> None:
    err = error_from_reply(b"\x00garbage", {H_ERROR: "timeout"})
    assert isinstance(err, CallTimeout)
    assert err.details["body"].endswith("garbage")
    assert "timeout" in err.message


def test_an_error_without_a_code_header_is_a_remote_error() -> None:
    err = error_from_reply(b"junk", None)
    assert isinstance(err, RemoteError)
