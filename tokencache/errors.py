"""Errors that are the user's to fix, told apart from bugs.

The command line prints a :class:`UserError` (and a ``ValueError``, ``FileNotFoundError``,
``OSError`` or ``MemoryError``: bad arguments, missing or unreadable files, a full disk) as one
line naming the fix, exit 2. Everything else — a ``RuntimeError`` from the engine, a method or
torch, an ``AssertionError``, a ``TypeError`` — keeps its traceback: it is a bug, and the
traceback is what finds it.

``UserError`` derives from ``Exception``, not ``ValueError``: not every mistake of the user is a
bad value (a plugin that does not import, a device the machine lacks, a download that fails), and
a ``ValueError`` base would let every ``except ValueError`` in the code catch those too. Each
concrete class keeps the built-in base it had before (``CheckpointError(UserError, ValueError)``,
``PluginError(UserError, RuntimeError)``, …), so every existing ``except`` clause and test that
names the built-in still catches it.

This module is the bottom layer: it imports nothing, so any module may raise these.
"""
from __future__ import annotations


class UserError(Exception):
    """Something the user gave or asked for is wrong or missing: a checkpoint, a calibration
    file, a plugin, a download, a device. The message is one line that says what and how to fix it."""


class DeviceUnavailable(UserError, RuntimeError):
    """A device was asked for (``--device cuda``) that this machine or this torch build does not have."""
