"""The bootstrap node: first contact of a run, publisher of its manifest (keys, SQLite state and the
dashboard come with the bootstrap issue)."""

from bootstrap.node import BootstrapNode, build_manifest

__all__ = ["BootstrapNode", "build_manifest"]
