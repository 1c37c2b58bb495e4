"""Every error Butterfly raises, as one tree whose classes say how to react.

    ButterflyError                     retriable  fatal  blames a peer
    ├── ApiError
    │   ├── InvalidRequest                no        no
    │   ├── PayloadTooLarge               no        no
    │   ├── RateLimited                   yes       no
    │   ├── ServiceUnavailable            yes       no
    │   └── InternalError                 no        no
    ├── SchedulingError
    │   ├── QueueFull                     yes       no
    │   ├── TaskAlreadyExists             no        no
    │   ├── TaskNotFound                  no        no
    │   │   └── TaskNotHeld               no        no
    │   ├── InvalidTransition             no        no
    │   ├── InvalidTask                   no        no
    │   ├── CoordinationUnavailable       yes       no
    │   └── PartitionFailed               no        no
    ├── PartitionError
    │   ├── NoNodesAvailable              yes       no
    │   ├── InvalidConfiguration          no        no
    │   ├── InsufficientResources         no        no
    │   ├── OptimizationFailed            no        no
    │   └── UnknownStrategy               no        no
    ├── CoordinationError
    │   ├── ConsensusTimeout              yes       no
    │   ├── InsufficientNodes             no        yes
    │   ├── ByzantineViolation            no        no     yes
    │   ├── PhaseTransitionFailed         no        no
    │   ├── CoordinationNetworkFailed     yes       no
    │   ├── StageLost                     yes       no
    │   └── InvalidMessage                no        no     yes
    ├── NetworkError
    │   ├── ConnectionFailed              yes       no
    │   ├── SendTimeout                   yes       no
    │   ├── SerializationFailed           no        no     yes
    │   ├── Unreachable                   yes       no
    │   ├── CircuitOpen                   yes       no
    │   └── NoMessages                    yes       no
    ├── ModelError                                          (runtime/, loading and forward)
    │   ├── UnknownArchitecture           no        yes
    │   ├── MissingTensor                 no        yes
    │   ├── TensorShapeMismatch           no        yes
    │   ├── UnsupportedPrecision          no        yes
    │   ├── LayerRangeError               no        no
    │   ├── ContextLengthExceeded         no        no
    │   ├── InvalidInput                  no        no
    │   └── WireFormatError               no        no     yes
    │       └── MessageTooLarge           no        no     yes (when a peer sent it)
    ├── ConfigError                       no        yes
    └── ButterflySystemError              no        yes
        └── StoreUnusable                 no        yes

`retriable`: the same call may succeed later or elsewhere (retry with backoff, re-route).
`fatal`: the process cannot go on serving; report and stop rather than retry.
`blame`: the peer whose message caused the error, so the caller can ban or report it.

The gateway's pipeline engine acts on these and on nothing else: a step that fails with a
retriable error is replayed on the plan in force, any other fails the request; the node
an error blames (the authenticated sender, never the node a frame claims) is counted in
`butterfly_peer_errors_total{node,error}`, and a timed-out step blamed on a node counts
toward that node's eviction as silent (`dataplane.unresponsive`).
"""

from __future__ import annotations

from typing import ClassVar

from butterfly.types.ids import NodeId


class ButterflyError(Exception):
    retriable: ClassVar[bool] = False
    fatal: ClassVar[bool] = False

    def __init__(self, message: str = "", *, blame: NodeId | None = None) -> None:
        super().__init__(message or self.default_message())
        self.blame = blame

    @classmethod
    def default_message(cls) -> str:
        return cls.__name__

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    @property
    def kind(self) -> str:
        """snake_case class name, used as the `type` of an HTTP error body."""
        name = type(self).__name__
        return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


# --- API -------------------------------------------------------------------------------


class ApiError(ButterflyError):
    pass


class InvalidRequest(ApiError):
    pass


class PayloadTooLarge(ApiError):
    pass


class RateLimited(ApiError):
    retriable = True

    def __init__(self, message: str = "", *, retry_after_s: float = 1.0) -> None:
        """`retry_after_s`: when a request would be let through (its 429's Retry-After)."""
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ServiceUnavailable(ApiError):
    retriable = True


class InternalError(ApiError):
    pass


# --- scheduling ------------------------------------------------------------------------


class SchedulingError(ButterflyError):
    pass


class QueueFull(SchedulingError):
    retriable = True


class TaskAlreadyExists(SchedulingError):
    pass


class TaskNotFound(SchedulingError):
    pass


class TaskNotHeld(TaskNotFound):
    """A task this gateway knows was accepted and ended elsewhere, but does not hold: a
    gateway away for long is given the newest results only. Still a 404 (there is no
    result here), but not one that says the id was never handed out."""


class InvalidTransition(SchedulingError):
    pass


class InvalidTask(SchedulingError):
    pass


class CoordinationUnavailable(SchedulingError):
    retriable = True


class PartitionFailed(SchedulingError):
    pass


# --- partition -------------------------------------------------------------------------


class PartitionError(ButterflyError):
    pass


class NoNodesAvailable(PartitionError):
    retriable = True

    @classmethod
    def default_message(cls) -> str:
        return "no nodes available to place the model on"


class InvalidConfiguration(PartitionError):
    pass


class InsufficientResources(PartitionError):
    pass


class OptimizationFailed(PartitionError):
    pass


class UnknownStrategy(PartitionError):
    pass


# --- coordination ----------------------------------------------------------------------


class CoordinationError(ButterflyError):
    pass


class ConsensusTimeout(CoordinationError):
    retriable = True


class InsufficientNodes(CoordinationError):
    fatal = True


class ByzantineViolation(CoordinationError):
    pass


class PhaseTransitionFailed(CoordinationError):
    pass


class CoordinationNetworkFailed(CoordinationError):
    retriable = True


class InvalidMessage(CoordinationError):
    pass


class StageLost(CoordinationError):
    """A step's stage went away (node failed, plan changed): replay on the new plan."""

    retriable = True


# --- network ---------------------------------------------------------------------------


class NetworkError(ButterflyError):
    pass


class ConnectionFailed(NetworkError):
    retriable = True


class SendTimeout(NetworkError):
    retriable = True


class SerializationFailed(NetworkError):
    pass


class Unreachable(NetworkError):
    retriable = True


class CircuitOpen(NetworkError):
    retriable = True


class NoMessages(NetworkError):
    retriable = True


# --- model runtime ---------------------------------------------------------------------


class ModelError(ButterflyError):
    pass


class UnknownArchitecture(ModelError):
    fatal = True


class MissingTensor(ModelError):
    fatal = True


class TensorShapeMismatch(ModelError):
    fatal = True


class UnsupportedPrecision(ModelError):
    """A `model.dtype` or `model.quantization` this CPU, torch build or model family
    cannot compute in; the message names the setting to change."""

    fatal = True


class LayerRangeError(ModelError):
    pass


class ContextLengthExceeded(ModelError):
    pass


class InvalidInput(ModelError):
    pass


class WireFormatError(ModelError):
    pass


class MessageTooLarge(WireFormatError):
    """A message over network.max_message_bytes: refused by its sender before a byte is
    sent (no blame: the same message is too large anywhere), or from a peer, which is
    then blamed and disconnected."""


# --- configuration and system ----------------------------------------------------------


class ConfigError(ButterflyError):
    fatal = True


class ButterflySystemError(ButterflyError):
    fatal = True


class StoreUnusable(ButterflySystemError):
    """A gateway's task store that SQLite cannot open (corrupt, locked by another
    process, written by a newer Butterfly): the node cannot start, and the message says
    which file and what to do."""
