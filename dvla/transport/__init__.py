"""The data plane: msgpack-framed channels for observations, actions and trajectories.

``frames`` is the wire format, ``codec`` the message schemas, ``auth`` the handshake and
TLS, ``connection`` one authenticated channel, ``endpoints`` the transports (TCP, Unix
socket, in-memory, UCX) and ``channel`` the pipeline's client and server on top.
"""
