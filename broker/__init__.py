"""The Signalbox agent SDK: what an agent imports, and nothing of the control plane.

Public API: the agent and its model calls, settings, the connection, the
subjects, the codec and the error tree::

    from broker import Agent, CallDenied, ModelCall, Settings, connect

The SDK needs only nats-py, msgspec, pydantic-settings, tenacity and the
OpenTelemetry API (``pip install signalbox``). The control plane's plumbing
(service base, consumers, audit emitter, KV caches, SQL, embedded server,
identity) is :mod:`broker.runtime`, installed with ``signalbox[server]``;
``tests/test_sdk_import.py`` keeps the two apart. ``broker`` never imports
``services``.
"""

from __future__ import annotations

from broker.agent import Agent
from broker.codec import decode, encode
from broker.connection import connect
from broker.errors import (
    AttributeMismatch,
    AuditUnavailable,
    AuthenticationFailed,
    BadRequest,
    BreakerOpen,
    BudgetExceeded,
    CallDenied,
    CallError,
    CallInProgress,
    CallTimeout,
    ConfigError,
    Conflict,
    ControlPlaneUnavailable,
    DeadlineExceeded,
    IdentityMismatch,
    InvalidInput,
    InvalidReplySubject,
    InvalidSubjectToken,
    JetStreamUnavailable,
    NatsUnreachable,
    NotFound,
    OutcomeUnknown,
    PayloadTooLarge,
    PortInUse,
    PublishRefused,
    RemoteError,
    SchemaError,
    ServerBinaryNotFound,
    ServerError,
    ServerStartTimeout,
    SignalboxError,
    TargetUnavailable,
    UnknownTarget,
    UsageNotRecorded,
)
from broker.modelcall import ModelCall
from broker.process import run, serve
from broker.serving import CallContext
from broker.settings import Settings
from broker.subjects import Subjects, validate_token

__all__ = [
    "Agent",
    "AttributeMismatch",
    "AuditUnavailable",
    "AuthenticationFailed",
    "BadRequest",
    "BreakerOpen",
    "BudgetExceeded",
    "CallContext",
    "CallDenied",
    "CallError",
    "CallInProgress",
    "CallTimeout",
    "ConfigError",
    "Conflict",
    "ControlPlaneUnavailable",
    "DeadlineExceeded",
    "IdentityMismatch",
    "InvalidInput",
    "InvalidReplySubject",
    "InvalidSubjectToken",
    "JetStreamUnavailable",
    "ModelCall",
    "NatsUnreachable",
    "NotFound",
    "OutcomeUnknown",
    "PayloadTooLarge",
    "PortInUse",
    "PublishRefused",
    "RemoteError",
    "SchemaError",
    "ServerBinaryNotFound",
    "ServerError",
    "ServerStartTimeout",
    "Settings",
    "SignalboxError",
    "Subjects",
    "TargetUnavailable",
    "UnknownTarget",
    "UsageNotRecorded",
    "connect",
    "decode",
    "encode",
    "run",
    "serve",
    "validate_token",
]
