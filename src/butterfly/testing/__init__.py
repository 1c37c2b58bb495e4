"""Fakes and harnesses shipped with the package, composed into nodes by tests.

Faults are injected by composition (a faulty part, a lying replica wrapper, a simulated
network), never by flags inside production types.
"""
