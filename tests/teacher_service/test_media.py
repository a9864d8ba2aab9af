"""Media decoding on hostile input: every refusal is an InvalidRequest naming the field, and nothing
is decoded beyond the limits (sizes and frame counts are read from headers first)."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from teacher_service.errors import InvalidRequest
from teacher_service.media import MediaLimits, decode_animation, decode_image, read_url
FIELD = "sequences.0.prompt.0.content.0.image_url.url"


def png(color: tuple[int, int, int], size: tuple[int, int] = (40, 30), square_at: int | None = None) -> bytes:
    """PNG bytes of a plain picture, with a white 8-pixel square at x = `square_at` when given."""
    image = Image.new("RGB", size, color)
    if square_at is not None:
        image.paste((255, 255, 255), (square_at, 4, square_at + 8, 12))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels and whose data is one tiny compressed block:
    decoded, it would need width x height x 3 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")


def gif(frames: int, size: tuple[int, int] = (16, 16)) -> bytes:
    images = [Image.new("RGB", size, (i * 7 % 256, 0, 0)) for i in range(frames)]
    out = io.BytesIO()
    images[0].save(out, format="GIF", save_all=True, append_images=images[1:], duration=40, loop=0)
    return out.getvalue()


def refused(call, *args, field: str = FIELD) -> str:
    with pytest.raises(InvalidRequest) as error:
        call(*args)
    assert error.value.field == field
    return error.value.message


def test_an_image_decodes_to_rgb_pixels():
    image = decode_image(png((255, 0, 0)), MediaLimits(), FIELD)
    assert (image.mode, image.size, image.getpixel((0, 0))) == ("RGB", (40, 30), (255, 0, 0))


@pytest.mark.parametrize("width, height", [(100_000, 100_000), (2**31 - 1, 2**31 - 1), (5000, 4000)])
def test_a_huge_declared_size_is_refused_from_the_header(width, height):
    # 5000x4000 passes Pillow's own bomb check but not the teacher's limit; the others fail both.
    message = refused(decode_image, png_declaring(width, height), MediaLimits(), FIELD)
    assert "pixels" in message or "decompression bomb" in message


def test_the_pixel_limit_is_the_teachers_setting():
    assert "max_image_pixels" in refused(decode_image, png((0, 0, 0)), MediaLimits(max_image_pixels=40 * 30 - 1), FIELD)
    assert decode_image(png((0, 0, 0)), MediaLimits(max_image_pixels=40 * 30), FIELD).size == (40, 30)


def test_truncated_data_is_refused():
    data = png((10, 200, 30), size=(64, 64), square_at=3)
    assert "corrupt or truncated" in refused(decode_image, data[: len(data) // 2], MediaLimits(), FIELD)


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"%PDF-1.4\n", b"\x89PNG\r\n\x1a\n"])
def test_bytes_that_are_no_image_are_refused(data):
    assert "not a PNG, JPEG, GIF, WebP or BMP image" in refused(decode_image, data, MediaLimits(), FIELD)


def test_formats_outside_the_list_are_refused_even_when_pillow_reads_them():
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, format="TIFF")
    refused(decode_image, out.getvalue(), MediaLimits(), FIELD)


def test_an_animation_is_a_video_and_its_frame_count_is_limited():
    frames = decode_animation(gif(5), MediaLimits(), FIELD)
    assert [f.getpixel((0, 0))[0] for f in frames] == [0, 7, 14, 21, 28]
    assert "max_video_frames" in refused(decode_animation, gif(5), MediaLimits(max_video_frames=4), FIELD)


@pytest.mark.parametrize("url, message", [
    ("https://example.com/cat.png", "the teacher fetches nothing"),
    ("data:image/png,rawbytes", "must be base64"),
    ("data:image/png;base64,@@@@", "invalid base64"),
    ("file:///etc/passwd", "without --allowed-local-media-path"),
])
def test_urls_other_than_data_are_refused(url, message):
    assert message in refused(read_url, url, MediaLimits(), FIELD)


def test_file_urls_are_read_under_the_allowed_directory_only(tmp_path):
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "red.png").write_bytes(png((255, 0, 0)))
    (tmp_path / "secret.png").write_bytes(png((0, 0, 0)))
    limits = MediaLimits(local_media_path=str(allowed))
    assert read_url(f"file://{allowed}/red.png", limits, FIELD) == png((255, 0, 0))
    assert "outside the allowed media directory" in refused(read_url, f"file://{allowed}/../secret.png", limits, FIELD)
    assert "cannot read" in refused(read_url, f"file://{allowed}/missing.png", limits, FIELD)


def test_a_data_url_round_trips_its_bytes():
    data = png((1, 2, 3))
    assert read_url("data:image/png;base64," + base64.b64encode(data).decode(), MediaLimits(), FIELD) == data
