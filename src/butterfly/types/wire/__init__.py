"""The one wire schema: every message nodes exchange, frozen and tagged, one codec.

    base        PROTOCOL_VERSION, field aliases (Digest, Signature, Text), `Ask[R]`
    codec       the strict msgpack codec every message kind goes through
    checks      its field checkers and the wire's limits
    data        data path: stage steps, results, audits, KV copies, link probes
    control     handshake, heartbeat, plans, status, config agreement
    frames      what a transport frame may carry (data + control) and its body codec
    agreement   PBFT messages, signed stage-step records, coordination; their codec
    commands    the operations PBFT orders (an agreement request's `operation` bytes)

Ids are the `NewType`s of `butterfly.types.ids`; a request declares its reply by
subclassing `Ask[Reply]`, and the transports' `ask` returns exactly that reply.
"""
