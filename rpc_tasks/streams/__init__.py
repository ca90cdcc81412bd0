"""RPC over Redis Streams (the seed's protocol): :class:`WebSocketRPCClient` puts requests on a
stream and waits for replies on a list; :class:`RPCServer` consumes them in a consumer group.

* :mod:`.client` - the client; :mod:`.server` - the consumer loops;
* :mod:`.dispatch` - the method table and one entry's path; :mod:`.builtins` - ``ping``/``echo``;
* :mod:`.io` - every Redis call of the protocol.
"""

from .builtins import EchoParams, EchoResult, PingParams, PingResult
from .client import WebSocketRPCClient, get_rpc_client
from .dispatch import Dispatcher, Handler
from .server import RPCServer

__all__ = [
    "Dispatcher",
    "EchoParams",
    "EchoResult",
    "Handler",
    "PingParams",
    "PingResult",
    "RPCServer",
    "WebSocketRPCClient",
    "get_rpc_client",
]
