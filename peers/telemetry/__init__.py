"""What a peer tells about itself and the run: ``publisher`` (one lifecycle for all of it),
``activity``, ``metrics`` (Prometheus, beside ``health``: ``/health`` and ``/ready``), ``monitor`` and ``hardware``, ``runcontrol`` (following the
owner's pause and stop) and ``status`` (the data of ``swarm status`` and the dashboard)."""

__all__: list[str] = []
