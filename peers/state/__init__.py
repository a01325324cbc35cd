"""A stage's state: as data (``snapshot``), checkpoints on disk and in the run's store (``checkpoints``,
``checkpoint_files``, ``checkpoint_check``, ``store_protocol``, ``store_client``), and getting it back
on join or after falling behind (``recovery``, ``resync``)."""

__all__: list[str] = []
