"""Engines move messages between roles; the roles' code is the same under every engine."""

from hsplitlora.engines.inprocess import InProcessEngine

__all__ = ["InProcessEngine"]
