"""Wire formats: tensor formats round-trip with their documented error and exact sizes; image
codecs compress as expected; bad names and values are one-line errors."""

from __future__ import annotations

import zlib

import numpy as np
import PIL.features
import pytest
import torch
from PIL import Image

from hnd.codec import IMAGE_CODECS, decode_image, decode_tensor, encode_image, encode_tensor, tensor_roundtrip
from hnd.tensor_codec import TENSOR_FORMATS, tensor_bytes

from conftest import error


def _z(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3 + 1


def _scale(z: torch.Tensor) -> float:
    return (z.max() - z.min()).item() / 255


def test_fp32_exact_and_sized():
    z = _z(3, 5, 7)
    data = encode_tensor(z, "fp32")
    assert len(data) == 4 * z.numel() == tensor_bytes(z.shape, "fp32")
    assert torch.equal(decode_tensor(data, "fp32", z.shape), z)
    assert data == z.numpy().astype("<f4").tobytes()  # raw little-endian


def test_fp16_close_and_sized():
    z = _z(3, 5, 7)
    data = encode_tensor(z, "fp16")
    assert len(data) == 2 * z.numel()
    back = decode_tensor(data, "fp16", z.shape)
    assert back.dtype == torch.float32
    assert torch.equal(back, z.half().float())
    assert not torch.equal(back, z)


def test_int8_error_at_most_half_a_step():
    z = _z(12, 6, 6)
    data = encode_tensor(z, "int8")
    assert len(data) == z.numel() + 8 == tensor_bytes(z.shape, "int8")
    back = decode_tensor(data, "int8", z.shape)
    err = (back - z).abs().max().item()
    assert 0 < err <= _scale(z) / 2 + 1e-5
    assert back.min().item() == pytest.approx(z.min().item(), abs=1e-6)
    assert back.max().item() == pytest.approx(z.max().item(), abs=1e-4)
    lo, scale = np.frombuffer(data[:8], "<f4")  # header: min, scale
    assert lo == pytest.approx(z.min().item()) and scale == pytest.approx(_scale(z))
    assert min(data[8:]) == 0 and max(data[8:]) == 255  # min and max map to the end codes


def test_int8_zlib_is_int8_compressed():
    z = torch.zeros(8, 16, 16)
    z[:, 4:8, 4:8] = _z(8, 4, 4)  # mostly constant: compresses well
    int8, packed = encode_tensor(z, "int8"), encode_tensor(z, "int8+zlib")
    assert zlib.decompress(packed) == int8
    assert len(packed) < len(int8) / 3
    assert torch.equal(decode_tensor(packed, "int8+zlib", z.shape), decode_tensor(int8, "int8", z.shape))


@pytest.mark.parametrize("fmt", TENSOR_FORMATS)
def test_constant_tensor(fmt):
    z = torch.full((2, 3, 3), -2.5)
    back = decode_tensor(encode_tensor(z, fmt), fmt, z.shape)
    assert torch.equal(back, z)
    assert torch.isfinite(back).all()


def test_roundtrip_sends_each_image_on_its_own():
    z = torch.stack([_z(3, 4, 4, seed=0), 100 * _z(3, 4, 4, seed=1)])  # very different ranges
    back, sizes = tensor_roundtrip(z, "int8")
    assert back.shape == z.shape and sizes == [3 * 16 + 8] * 2
    for i in range(2):  # each image quantized with its own min/max, so each has its own step
        assert (back[i] - z[i]).abs().max().item() <= _scale(z[i]) / 2 + 1e-4
    back, sizes = tensor_roundtrip(z, "fp32")
    assert torch.equal(back, z) and sizes == [4 * 48] * 2
    _, sizes = tensor_roundtrip(torch.zeros(3, 2, 8, 8), "int8+zlib")
    assert len(sizes) == 3 and all(s < 2 * 64 for s in sizes)


def test_int8_rejects_nonfinite():
    assert "finite" in error(encode_tensor, torch.tensor([1.0, float("inf")]), "int8")


def test_tensor_errors():
    message = error(encode_tensor, torch.zeros(2), "int4")
    assert "int4" in message and all(f in message for f in TENSOR_FORMATS)
    assert "bf16" in error(decode_tensor, b"", "bf16", (1,))
    assert "8 bytes" in error(decode_tensor, b"\0" * 12, "fp32", (2,))
    assert "decompress" in error(decode_tensor, b"not zlib", "int8+zlib", (4,))
    assert "'float'" in error(tensor_roundtrip, torch.zeros(1, 2), "float")


def _photo(size: int = 64) -> Image.Image:
    """A smooth image with some noise, so that JPEG quality matters."""
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.float32)
    rgb += np.random.default_rng(0).normal(0, 12, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def test_jpeg_bytes_grow_with_quality():
    image = _photo()
    sizes = [len(encode_image(image, "jpeg", q)) for q in (10, 50, 90)]
    assert sizes[0] < sizes[1] < sizes[2] < 64 * 64 * 3
    back = np.asarray(decode_image(encode_image(image, "jpeg", 90)), dtype=np.int16)
    assert back.shape == (64, 64, 3)
    assert 0 < np.abs(back - np.asarray(image, dtype=np.int16)).mean() < 12


def test_png_is_lossless_and_ignores_quality():
    image = _photo()
    data = encode_image(image, "png", None)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(np.asarray(decode_image(data)), np.asarray(image))
    assert encode_image(image, "png", 5) == data


@pytest.mark.skipif(not PIL.features.check("webp"), reason="Pillow without WebP")
def test_webp_roundtrip():
    image = _photo()
    low, high = (encode_image(image, "webp", q) for q in (10, 90))
    assert low[8:12] == b"WEBP" and len(low) < len(high)
    assert decode_image(high).size == (64, 64) and decode_image(high).mode == "RGB"


def test_decode_image_converts_to_rgb():
    gray = Image.new("L", (8, 8), 128)
    assert decode_image(encode_image(gray, "png")).mode == "RGB"


@pytest.mark.parametrize("quality", [0, 101, 50.0, True, "75"])
def test_bad_quality(quality):
    assert "1 to 100" in error(encode_image, _photo(16), "jpeg", quality)


def test_image_errors():
    message = error(encode_image, _photo(16), "gif", 50)
    assert "gif" in message and all(c in message for c in IMAGE_CODECS)
    assert "cannot decode" in error(decode_image, b"not an image")


def test_missing_webp_is_explained(monkeypatch):
    monkeypatch.setattr(PIL.features, "check", lambda feature: False)
    assert "WebP" in error(encode_image, _photo(16), "webp", 50)


def test_the_device_side_formats_import_without_torch():
    """What an edge device needs to frame its bottleneck (every wire format, the range coder with
    the model's tables) and to read its preprocessing imports with torch unavailable, and its
    request frames are the torch side's, byte for byte."""
    import json
    import subprocess
    import sys

    from hnd.codec import encode_coded
    from hnd.entropy import FactorizedPrior, coding_tables
    from hnd.protocol import WIRE_FORMATS, encode_request

    torch.manual_seed(0)
    prior = FactorizedPrior(3).eval()
    prior.update_tables()
    tables = coding_tables(prior)
    z = torch.randn(3, 29, 29, generator=torch.Generator().manual_seed(1)) * 3
    code = ("import json, sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"
            "import numpy as np, hnd, hnd.preprocessing as p, hnd.protocol as w\n"
            "from hnd.range_coder import CodingTables\n"
            "doc = json.load(sys.stdin)\n"
            "tables = CodingTables.from_dict(doc['tables'])\n"
            "z = np.asarray(doc['z'], dtype=np.float32)\n"
            "print(json.dumps({f: w.encode_request(z, f, tables).hex() for f in w.WIRE_FORMATS}))\n"
            "print(p.Preprocessing(224, 256).to_dict()['resize_size'], sys.modules['torch'])")
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps({"tables": tables.to_dict(),
                                                                           "z": z.tolist()}),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    frames, last = done.stdout.splitlines()
    assert json.loads(frames) == {f: encode_request(z.numpy(), f, tables).hex() for f in WIRE_FORMATS}
    raw = encode_tensor(z, "fp32")
    assert bytes.fromhex(json.loads(frames)["fp32"])[-len(raw):] == raw
    assert bytes.fromhex(json.loads(frames)["entropy"]).endswith(encode_coded(prior, z))  # tables through JSON
    assert last == "256 None"  # torch was never imported
