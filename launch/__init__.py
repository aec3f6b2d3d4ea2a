"""Launchers: the local sweep runner and the Cloud TPU VM and multi-GPU host scripts.

Run them as modules from the repository root, e.g. `python -m launch.sweep --help`.
"""
