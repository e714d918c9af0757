"""Geofence geometry for edge rules: great-circle distance, point in polygon, and a grid that finds the few
geofences a position can be in without testing them all.

Coordinates follow the seeds: radius boundaries as ``lat``/``lon`` and metres, polygons as GeoJSON rings of
``[lon, lat]`` (the first ring the outline, any further rings holes). Planar tests on degrees are exact
enough for geofences of a few kilometres away from the poles and the antimeridian, which a ring crossing
is refused for (``definitions.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

EARTH_RADIUS_M = 6_371_008.8  # mean radius (IUGG)
CELL_DEG = 0.05  # grid cell: ~5.5 km of latitude; a geofence is filed under every cell its box touches
MAX_CELLS = 4096  # a geofence bigger than this many cells (a region) is tested for every position instead

Ring = Sequence[tuple[float, float]]  # (lon, lat), closed


def distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Haversine great-circle distance in metres."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))


def _in_ring(lon: float, lat: float, ring: Ring) -> bool:
    """Even-odd ray casting; a point on an edge may go either way (a fence is never that exact)."""
    inside = False
    x1, y1 = ring[-1]
    for x2, y2 in ring:
        if (y1 > lat) != (y2 > lat) and lon < x1 + (lat - y1) * (x2 - x1) / (y2 - y1):
            inside = not inside
        x1, y1 = x2, y2
    return inside


@dataclass(frozen=True, slots=True)
class Box:
    min_lon: float
    min_lat: float
    max_lon: float
    max_lat: float

    def contains(self, lon: float, lat: float) -> bool:
        return self.min_lon <= lon <= self.max_lon and self.min_lat <= lat <= self.max_lat


class Polygon:
    """A GeoJSON polygon: outline and holes, with its bounding box for a cheap first test."""

    __slots__ = ("box", "holes", "outline")

    def __init__(self, rings: Sequence[Ring]) -> None:
        self.outline = tuple(rings[0])
        self.holes = tuple(tuple(r) for r in rings[1:])
        lons = [p[0] for p in self.outline]
        lats = [p[1] for p in self.outline]
        self.box = Box(min(lons), min(lats), max(lons), max(lats))

    def contains(self, lat: float, lon: float) -> bool:
        if not self.box.contains(lon, lat) or not _in_ring(lon, lat, self.outline):
            return False
        return not any(_in_ring(lon, lat, hole) for hole in self.holes)


class Circle:
    __slots__ = ("box", "lat", "lon", "radius_m")

    def __init__(self, lat: float, lon: float, radius_m: float) -> None:
        self.lat, self.lon, self.radius_m = lat, lon, radius_m
        dlat = math.degrees(radius_m / EARTH_RADIUS_M)
        # Longitude degrees shrink with latitude; clamp near the poles (the box only has to cover the circle).
        dlon = dlat / max(math.cos(math.radians(min(89.0, abs(lat) + dlat))), 1e-6)
        self.box = Box(lon - dlon, lat - dlat, lon + dlon, lat + dlat)

    def contains(self, lat: float, lon: float) -> bool:
        return self.box.contains(lon, lat) and distance_m(lat, lon, self.lat, self.lon) <= self.radius_m


Shape = Polygon | Circle


class Grid:
    """Shapes filed by the grid cells their boxes touch: a position is tested against the shapes of its cell
    only. ``candidates`` returns their keys."""

    def __init__(self, shapes: Iterable[tuple[str, Shape]], cell_deg: float = CELL_DEG) -> None:
        self._cell = cell_deg
        self._cells: dict[tuple[int, int], list[tuple[str, Shape]]] = {}
        self._everywhere: list[tuple[str, Shape]] = []
        for key, shape in shapes:
            b = shape.box
            lons = range(self._index(b.min_lon), self._index(b.max_lon) + 1)
            lats = range(self._index(b.min_lat), self._index(b.max_lat) + 1)
            if len(lons) * len(lats) > MAX_CELLS:
                self._everywhere.append((key, shape))
                continue
            for i in lons:
                for j in lats:
                    self._cells.setdefault((i, j), []).append((key, shape))

    def _index(self, degrees: float) -> int:
        return math.floor(degrees / self._cell)

    def inside(self, lat: float, lon: float) -> set[str]:
        """Keys of the shapes that contain the position."""
        cell = self._cells.get((self._index(lon), self._index(lat)), ())
        found = {key for key, shape in cell if shape.contains(lat, lon)}
        found.update(key for key, shape in self._everywhere if shape.contains(lat, lon))
        return found
