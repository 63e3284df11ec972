"""paho's MQTT v5 `Properties`, with its lookup tables built once instead of per packet.

paho 2.x builds a `Properties` for every v5 PUBLISH it decodes (and every PUBACK it
reports), and each one builds a 26-entry name table and a 25-entry type table of its
own, then `unpack` clears it by walking those tables: 8-10 % of the daemon's CPU in
an MQTT burst (py-spy, bench/RESULTS.md session 22).  The tables are never written
after construction, so one copy serves every instance; everything else is paho's.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

_TABLES = Properties(PacketTypes.PUBLISH)
_OWN = frozenset(("packetType", "types", "names", "properties"))


class SharedTableProperties(Properties):
    """A `Properties` whose name and type tables are paho's, shared, not rebuilt."""

    def __init__(self, packetType: int) -> None:  # paho's signature
        object.__setattr__(self, "packetType", packetType)
        object.__setattr__(self, "types", _TABLES.types)
        object.__setattr__(self, "names", _TABLES.names)
        object.__setattr__(self, "properties", _TABLES.properties)

    def clear(self) -> None:
        # paho's walks its 26 names with a hasattr each; the set ones are just these.
        for name in [n for n in vars(self) if n not in _OWN]:
            delattr(self, name)


def _decoders() -> list[ModuleType]:
    """The paho modules that build `Properties` while decoding: paho 2.2 moved packet
    decoding to `paho.mqtt._packet`; 2.1 (which aiomqtt 2 accepts) has it all in client."""
    found = []
    for name in ("paho.mqtt._packet", "paho.mqtt.client"):
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            continue
    return found


def install() -> None:
    """Have paho's packet decoder and client build shared-table properties."""
    for module in _decoders():
        if getattr(module, "Properties", None) is Properties:
            module.Properties = SharedTableProperties  # type: ignore[attr-defined]
