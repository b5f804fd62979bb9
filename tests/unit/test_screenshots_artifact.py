"""L4b's screenshots artifact (dispatch/pipeline/browser_qa.py `screenshots_markdown`): thumbnails embedded as
`data:` images the Prefect UI shows on any machine, never a `file://` link, within its caps."""

from __future__ import annotations

import base64
import re
from pathlib import Path

from dispatch.pipeline.browser_qa import EMBEDDED_BYTES, EMBEDDED_MAX, screenshots_markdown, thumbnail_path


def _shot(folder: Path, name: str, thumbnail: bytes | None) -> str:
    png = folder / f"{name}.png"
    png.write_bytes(b"\x89PNG full size")
    if thumbnail is not None:
        thumbnail_path(png).write_bytes(thumbnail)
    return str(png)


def test_thumbnails_are_embedded_up_to_the_caps_and_the_rest_named(tmp_path: Path):
    shots = {f"/p{i} 1920x1080": _shot(tmp_path, f"{i:02d}-p{i}-1920x1080", f"jpeg {i}".encode())
             for i in range(EMBEDDED_MAX + 3)}
    shots["/big 375x812"] = _shot(tmp_path, "big-375x812", b"x" * (EMBEDDED_BYTES + 1))
    shots["/none 375x812"] = _shot(tmp_path, "none-375x812", None)
    markdown = screenshots_markdown(shots)

    embedded = re.findall(r"!\[[^\]]*\]\(data:image/jpeg;base64,([A-Za-z0-9+/=]+)\)", markdown)
    assert [base64.b64decode(data) for data in embedded] == [f"jpeg {i}".encode() for i in range(EMBEDDED_MAX)]
    assert "file://" not in markdown and str(tmp_path) in markdown  # where the full-size PNGs are
    assert f"{EMBEDDED_MAX} of {len(shots)} shown" in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| /")]
    assert len(rows) == len(shots) and all(row.count(" | ") == 3 for row in rows)


def test_a_page_path_cannot_break_the_table(tmp_path: Path):
    markdown = screenshots_markdown({"/a|b](javascript:x) 375x812": _shot(tmp_path, "a", b"jpeg")})
    row = next(line for line in markdown.splitlines() if line.startswith("| /"))
    assert row.count(" | ") == 3 and not re.search(r"(?<!\\)\]\(javascript", row), row  # `]` is escaped
