"""``swarm.errors``: the error tree users catch, at the public face (defined in ``core.errors``).

The same classes, not copies: ``except swarm.errors.PeerUnavailable`` catches what any layer raises.
Errors cross the wire by class name (``core.errors.error_from_wire``), never by module path.
"""

from core.errors import *  # noqa: F403  (the whole tree, re-exported)
from core.errors import __all__  # noqa: F401
