"""Serving a stage for generation: KV-cache sessions (``sessions``), their RPCs (``protocol``,
``service``) and the client (``client``)."""

__all__: list[str] = []
