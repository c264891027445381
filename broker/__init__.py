"""Shared plumbing of Signalbox and the agent SDK.

``broker`` never imports ``services``. Public API::

    from broker import Agent, Settings, EmbeddedServer, Subjects, connect
"""

from __future__ import annotations

from broker.agent import Agent, CallContext
from broker.audit import AuditEmitter, new_id
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
from broker.server import EmbeddedServer
from broker.settings import Settings
from broker.subjects import Subjects, validate_token

__all__ = [
    "Agent",
    "AttributeMismatch",
    "AuditEmitter",
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
    "EmbeddedServer",
    "IdentityMismatch",
    "InvalidInput",
    "InvalidReplySubject",
    "InvalidSubjectToken",
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
    "new_id",
    "validate_token",
]
