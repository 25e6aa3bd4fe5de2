"""Devices, the two backends and the layout of the state over them; several processes.

pmap and shard_map map one per-device step; the layout splits the state over the devices
(ZeRO); processes join, meet and agree through JAX's coordination service.
"""
