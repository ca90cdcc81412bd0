"""Pydantic 2 models of the RPC protocol (the seed's ``models/websocket`` package)."""

from .base import BaseRPCMessage, BaseRPCRequest, BaseRPCResponse
from .broadcast import BroadcastRequest, BroadcastResponse, BroadcastTarget
from .connections import ConnectionInfo, ConnectionState, ConnectionStateUpdate
from .errors import (
    DEFAULT_RETRYABLE_CODES,
    RateLimitError,
    RPCError,
    RPCErrorCode,
    RPCValidationError,
    TimeoutError,
    TimeoutErrorModel,
    UserNotConnectedError,
)
from .notifications import (
    BatchNotificationRequest,
    BatchNotificationResponse,
    NotificationPriority,
    NotificationRequest,
    NotificationResponse,
)
from .rpc import RPCRequest, RPCResponse

__all__ = [
    "DEFAULT_RETRYABLE_CODES",
    "BaseRPCMessage",
    "BaseRPCRequest",
    "BaseRPCResponse",
    "BatchNotificationRequest",
    "BatchNotificationResponse",
    "BroadcastRequest",
    "BroadcastResponse",
    "BroadcastTarget",
    "ConnectionInfo",
    "ConnectionState",
    "ConnectionStateUpdate",
    "NotificationPriority",
    "NotificationRequest",
    "NotificationResponse",
    "RPCError",
    "RPCErrorCode",
    "RPCRequest",
    "RPCResponse",
    "RPCValidationError",
    "RateLimitError",
    "TimeoutError",
    "TimeoutErrorModel",
    "UserNotConnectedError",
]
