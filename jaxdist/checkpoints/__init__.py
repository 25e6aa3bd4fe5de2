"""Checkpoints and the workdir.

Orbax-written state with its manifest, background saves, the workdir's lock and identity.
"""
