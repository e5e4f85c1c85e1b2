"""The daemon (``meshd``), its local API, metrics and the ``meshctl`` CLI."""
