"""farm/layout.py: where a render sits on a delivered aspect ratio."""

from __future__ import annotations

import pytest

from farm import layout
from farm.layout import ANCHORS, compute, output_size

SIZES = {"16:9": (320, 180), "9:16": (180, 320), "1:1": (256, 256), "4:5": (256, 320)}
RENDERS = [(640, 480), (480, 640), (512, 512), (1280, 720)]


def face_centre(lay: layout.Layout, box: tuple[int, int, int]) -> tuple[float, float]:
    x0, y0, side = box
    sx, sy = lay.scaled[0] / lay.render[0], lay.scaled[1] / lay.render[1]
    return lay.offset[0] + (x0 + side / 2) * sx, lay.offset[1] + (y0 + side / 2) * sy


@pytest.mark.parametrize("aspect", sorted(SIZES))
@pytest.mark.parametrize("render", RENDERS)
def test_contain_shows_the_whole_render_and_cover_fills_the_canvas(aspect, render):
    size = SIZES[aspect]
    w, h = render
    box = (w // 3, h // 5, w // 4)
    inside = compute(size, render, box, "contain", aspect)
    assert inside.size == size
    # the render keeps its proportions (within a pixel of rounding) ...
    assert abs(inside.scaled[0] / w - inside.scaled[1] / h) <= 1.0 / min(w, h)
    # ... touches two sides and is never cropped
    assert inside.scaled[0] == size[0] or inside.scaled[1] == size[1]
    assert 0 <= inside.offset[0] <= size[0] - inside.scaled[0]
    assert 0 <= inside.offset[1] <= size[1] - inside.scaled[1]

    full = compute(size, render, box, "cover", aspect)
    fill = max(size[0] / w, size[1] / h)
    # filled, zoomed no further than MAX_ZOOM (to place the face), in proportion
    assert fill - 1.0 / w <= full.scale <= layout.MAX_ZOOM[aspect] * fill + 1.0 / w
    assert abs(full.scaled[0] / w - full.scaled[1] / h) <= 1.0 / min(w, h)
    assert full.scaled[0] >= size[0] and full.scaled[1] >= size[1]
    # no empty edge: the render covers [0, size) on both axes
    assert full.offset[0] <= 0 and full.offset[0] + full.scaled[0] >= size[0]
    assert full.offset[1] <= 0 and full.offset[1] + full.scaled[1] >= size[1]
    for lay in (inside, full):
        assert all(isinstance(v, int) for v in (*lay.scaled, *lay.offset))
        rows, cols, srows, scols = lay.window()
        assert rows.stop - rows.start == srows.stop - srows.start > 0
        assert cols.stop - cols.start == scols.stop - scols.start > 0


@pytest.mark.parametrize("aspect", sorted(SIZES))
def test_the_face_goes_where_the_aspect_puts_it_when_there_is_room(aspect):
    # A wide render on a tall canvas (or a tall one on a wide canvas) has room to move
    # along the canvas's long axis; the face centre lands on the aspect's anchor.
    size = SIZES[aspect]
    render = (2000, 600) if size[1] >= size[0] else (600, 2000)
    box = (900, 200, 200) if size[1] >= size[0] else (200, 900, 200)
    lay = compute(size, render, box, "contain", aspect)
    cx, cy = face_centre(lay, box)
    ax, ay = ANCHORS[aspect]
    if size[1] > size[0]:
        assert abs(cy - ay * size[1]) <= 1
    elif size[0] > size[1]:
        assert abs(cx - ax * size[0]) <= 1
    lay = compute(size, (1000, 1000), (400, 200, 200), "cover", aspect)
    cx, cy = face_centre(lay, (400, 200, 200))
    if size[0] < size[1]:  # cover crops the sides: the face is centred across
        assert abs(cx - ax * size[0]) <= 1
    if aspect == "1:1":
        assert lay.offset == (0, 0)  # nothing to move: square on square


def test_nine_sixteen_puts_the_head_in_the_upper_third():
    size = (1080, 1920)
    for render, box in (((1280, 720), (540, 200, 200)), ((640, 480), (250, 150, 140))):
        for fit in ("contain", "cover"):
            lay = compute(size, render, box, fit, "9:16")
            _, cy = face_centre(lay, box)
            assert cy < size[1] / 3, (render, fit, lay)


def test_cover_fills_exactly_when_the_face_can_reach_its_place_and_zooms_when_not():
    # a face high in a landscape render reaches the upper third at the filling scale
    lay = compute((180, 320), (640, 360), (300, 40, 60), "cover", "9:16")
    assert lay.scaled == (569, 320)
    # a face in the middle needs a zoom; at most MAX_ZOOM
    lay = compute((180, 320), (640, 360), (300, 150, 60), "cover", "9:16")
    assert 320 < lay.scaled[1] <= layout.MAX_ZOOM["9:16"] * 320
    # a face at the very bottom cannot reach the upper third: zoom capped, edge kept
    lay = compute((180, 320), (640, 360), (300, 300, 60), "cover", "9:16")
    assert (
        lay.scaled[1] == round(layout.MAX_ZOOM["9:16"] * 320)
        and lay.offset[1] + lay.scaled[1] >= 320
    )


def test_the_offset_is_clamped_rather_than_crop_or_leave_an_edge():
    # A face at the very bottom of a landscape render: contain would lift the render
    # above the canvas to reach the anchor; it stays at the top edge instead (no crop).
    lay = compute((180, 320), (640, 480), (300, 440, 40), "contain", "9:16")
    assert lay.offset[1] == 0
    # and a face at the very top moves the render down only as far as the bottom edge
    lay = compute((180, 320), (2000, 480), (1000, 0, 10), "contain", "9:16")
    assert lay.offset[1] == 320 - lay.scaled[1] or lay.offset[1] == round(0.3 * 320)
    # A face at the far right of a wide render in cover: the anchor would pull the
    # render's right edge inside the canvas; it stops at the edge (no empty strip).
    lay = compute((180, 320), (1280, 720), (1240, 300, 40), "cover", "9:16")
    assert lay.offset[0] == 180 - lay.scaled[0]
    # and at the far left, the left edge stays at 0
    lay = compute((180, 320), (1280, 720), (0, 300, 40), "cover", "9:16")
    assert lay.offset[0] == 0


def test_same_inputs_same_layout_and_identity_when_nothing_changes():
    args = ((1080, 1920), (1280, 720), (600, 180, 210), "cover", "9:16")
    assert compute(*args) == compute(*args)
    same = compute((640, 480), (640, 480), (200, 100, 150), "contain")
    assert same.identity and same.scale == 1.0


def test_output_size_of_photo_jobs_and_drafts():
    assert output_size((1080, 1920), (640, 480), draft=False) == (1080, 1920)
    assert output_size((540, 960), (640, 480), draft=True) == (540, 960)  # halved already
    assert output_size((0, 0), (640, 480), draft=False) == (640, 480)
    assert output_size((0, 0), (642, 482), draft=True) == (320, 240)  # even sides
    half = compute((320, 240), (640, 480), (0, 0, 1), "contain")
    assert half.scaled == (320, 240) and half.offset == (0, 0) and half.scale == 0.5


def test_aspect_conventions_for_a_size_without_an_aspect():
    assert layout.aspect_of((1080, 1920)) == "9:16"
    assert layout.aspect_of((1280, 720)) == "16:9"
    assert layout.aspect_of((500, 512)) == "1:1"
    assert layout.aspect_of((800, 1000)) == "4:5"
    with pytest.raises(ValueError):
        layout.aspect_of((100, 100), "3:2")
    with pytest.raises(ValueError):
        compute((100, 100), (100, 100), (0, 0, 10), "stretch")
