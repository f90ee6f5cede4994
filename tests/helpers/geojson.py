"""What every GeoJSON the package writes must be: schema-valid, closed valid rings, unique ids."""

from __future__ import annotations

import json

import jsonschema
import shapely.geometry

POSITION = {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}
RING = {"type": "array", "items": POSITION, "minItems": 4}
GEOJSON_SCHEMA = {
    "type": "object",
    "required": ["type", "features"],
    "properties": {
        "type": {"const": "FeatureCollection"},
        "features": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "id", "geometry", "properties"],
                "properties": {
                    "type": {"const": "Feature"},
                    "id": {"type": "string", "format": "uuid"},
                    "geometry": {
                        "type": "object",
                        "required": ["type", "coordinates"],
                        "properties": {
                            "type": {"const": "Polygon"},
                            "coordinates": {"type": "array", "items": RING, "minItems": 1},
                        },
                    },
                    "properties": {
                        "type": "object",
                        "required": ["objectType", "classification", "measurements"],
                        "properties": {
                            "objectType": {"const": "detection"},
                            "classification": {
                                "type": "object",
                                "required": ["name", "color"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "color": {
                                        "type": "array",
                                        "items": {"type": "integer"},
                                        "minItems": 3,
                                        "maxItems": 3,
                                    },
                                },
                            },
                            "measurements": {"type": "object", "additionalProperties": {"type": "number"}},
                        },
                    },
                },
            },
        },
    },
}


def check_geojson(path) -> dict:
    """Schema-valid, closed rings, every polygon valid by shapely; returns the parsed collection."""
    data = json.loads(path.read_text())
    jsonschema.validate(data, GEOJSON_SCHEMA, format_checker=jsonschema.FormatChecker())
    for feature in data["features"]:
        ring = feature["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1]
        assert shapely.geometry.shape(feature["geometry"]).is_valid
    assert len({f["id"] for f in data["features"]}) == len(data["features"])
    return data
