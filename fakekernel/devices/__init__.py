"""Emulated devices of the fake kernel's catalog, each mirroring a device the real runner has."""

from .edu import Edu

CATALOG = {"edu": Edu}
