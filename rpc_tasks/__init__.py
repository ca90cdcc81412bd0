"""rpc-tasks: typed RPC as a first-class Dramatiq citizen.

::

    from rpc_tasks import rpc_actor, setup_broker

    setup_broker()

    @rpc_actor(queue_name="rpc", max_retries=3)
    def echo(params: EchoParams) -> EchoResult:
        return EchoResult(message=params.message)

    echo.send(EchoParams(message="hi"))
    result = echo.call(EchoParams(message="hi"), timeout=2.5)
    result = await echo.acall(EchoParams(message="hi"), timeout=2.5)  # in a coroutine
"""

from .actor import RPCActor, find_replies_middleware
from .aio import AsyncWebSocketRPCClient, aclose_loop_connections, get_async_rpc_client
from .broker_setup import check_broker, install_middleware, middleware_paths, setup_broker
from .config import WebSocketRPCConfig, get_config, redact_url
from .context import current_message
from .decorator import rpc_actor
from .exceptions import (
    RPCConfigurationError,
    RPCConnectionError,
    RPCException,
    RPCPayloadTooLargeError,
    RPCProtocolError,
    RPCRemoteError,
    RPCTimeoutError,
)
from .models import (
    BaseRPCMessage,
    BaseRPCRequest,
    BaseRPCResponse,
    BatchNotificationRequest,
    BatchNotificationResponse,
    BroadcastRequest,
    BroadcastResponse,
    BroadcastTarget,
    ConnectionInfo,
    ConnectionState,
    ConnectionStateUpdate,
    NotificationPriority,
    NotificationRequest,
    NotificationResponse,
    RateLimitError,
    RPCError,
    RPCErrorCode,
    RPCRequest,
    RPCResponse,
    RPCValidationError,
    TimeoutErrorModel,
    UserNotConnectedError,
)
from .streams import (
    EchoParams,
    EchoResult,
    PingParams,
    PingResult,
    RPCServer,
    WebSocketRPCClient,
    get_rpc_client,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncWebSocketRPCClient",
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
    "EchoParams",
    "EchoResult",
    "NotificationPriority",
    "NotificationRequest",
    "NotificationResponse",
    "PingParams",
    "PingResult",
    "RPCActor",
    "RPCConfigurationError",
    "RPCConnectionError",
    "RPCError",
    "RPCErrorCode",
    "RPCException",
    "RPCPayloadTooLargeError",
    "RPCProtocolError",
    "RPCRemoteError",
    "RPCRequest",
    "RPCResponse",
    "RPCServer",
    "RPCTimeoutError",
    "RPCValidationError",
    "RateLimitError",
    "TimeoutErrorModel",
    "UserNotConnectedError",
    "WebSocketRPCClient",
    "WebSocketRPCConfig",
    "__version__",
    "aclose_loop_connections",
    "check_broker",
    "current_message",
    "find_replies_middleware",
    "get_async_rpc_client",
    "get_config",
    "get_rpc_client",
    "install_middleware",
    "middleware_paths",
    "redact_url",
    "rpc_actor",
    "setup_broker",
]
