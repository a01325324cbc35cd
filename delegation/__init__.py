"""Delegation: a weak machine takes part through a strong peer (session protocol over hivemind P2P).

The delegator (``Delegator``) keeps its identity and key; the delegate (a ``peers.server.Peer`` with
``serve_delegations``) serves the delegator's stage as an extra slot and records a receipt per
microbatch; the delegator signs them into its own ledger. Messages and the sequence diagram:
``delegation.protocol``; the delegate's rules: ``delegation.sessions``.

May import: core, shards, dht, net, peers. Not trainer or bootstrap (its siblings); imported by swarm.
"""

from delegation.client import DelegationClient
from delegation.delegator import Delegator, DelegatorStatus, receipts_digest
from delegation.protocol import DelegateStatus, Receipt, SessionInfo, SessionState
from delegation.service import DelegationService, serve_delegations
from delegation.sessions import DelegateSessions, StageHost, TokenSet

__all__ = [
    "Delegator",
    "DelegatorStatus",
    "DelegationClient",
    "DelegationService",
    "DelegateSessions",
    "DelegateStatus",
    "Receipt",
    "SessionInfo",
    "SessionState",
    "StageHost",
    "TokenSet",
    "receipts_digest",
    "serve_delegations",
]
