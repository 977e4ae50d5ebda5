"""The edge's handle on the data plane, which exists only while the lifespan runs."""

from __future__ import annotations

from server.core.dataplane import DataPlane
from server.errors import ModelNotReady


class PlaneHandle:
    """Set by the lifespan once the models are loaded, cleared at shutdown."""

    __slots__ = ("plane",)

    def __init__(self) -> None:
        self.plane: DataPlane | None = None

    def get(self) -> DataPlane:
        plane = self.plane
        if plane is None:
            raise ModelNotReady("server is starting; models are not loaded yet")
        return plane
