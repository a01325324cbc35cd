"""Networking between nodes: how bytes and messages get from one peer to another, and who may send them.

``net.transport`` (the ``Transport`` interface, libp2p streams and the in-memory fake), ``net.channel`` (the
direct TCP data channel beside libp2p), ``net.framing``
(stream frames), ``net.wire`` (tensor codecs), ``net.rpc`` (the message base, reply envelope and handler
guard every service shares), ``net.admission`` (per-caller limits), ``net.auth`` (the access-token
gate and the client side of keyed runs) and ``net.relay`` (a slot on a circuit relay for a node behind NAT).

May import: core, shards, dht. Imported by: peers and everything above.
"""

__all__: list[str] = []
