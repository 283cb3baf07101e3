"""Ditto (antgroup/ditto-talkinghead) in farm: its networks written as farm modules
that load the official checkpoint files unchanged (BACKENDS.md)."""
