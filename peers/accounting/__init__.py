"""Who did what work: the signed contribution ledger (``ledger``) and the peer's recorder of it
(``contribution``)."""

__all__: list[str] = []
