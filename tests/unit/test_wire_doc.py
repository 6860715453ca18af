"""docs/wire.md is what clients in other languages read: it must name every frame and field."""

from pathlib import Path

from voxbus.wire import FRAME_TYPES

DOC = (Path(__file__).parents[2] / "docs" / "wire.md").read_text()


def test_every_frame_kind_is_documented_with_its_tag_and_fields():
    for tag, cls in FRAME_TYPES.items():
        row = next((line for line in DOC.splitlines() if f"`{cls.__name__}`" in line
                    and line.startswith(f"| {tag} |")), None)
        assert row, f"{cls.__name__} (tag {tag}) missing from docs/wire.md"
        for field in cls.model_fields:
            assert f"`{field}`" in row, f"{cls.__name__}.{field} undocumented"
