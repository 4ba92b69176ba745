"""Transports: the ``Transport`` interface, ZeroMQ + CurveZMQ, and an in-memory network (zmq lives here)."""
