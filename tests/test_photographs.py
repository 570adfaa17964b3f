"""The generated images against real photographs: JPEG and WebP sizes and the power spectrum's
slope, measured in the evaluation crop the book's default profile uses."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hnd.synth import fractal_noise, write_synthetic_dataset
from hnd.registry import resolve

pytest.importorskip("skimage")
from hnd.book.photographs import (SLOPE_TOLERANCE, TOLERANCE, image_statistics, load_images,  # noqa: E402
                                  reference_photographs, sample_paths, spectral_slope)

TEACHER, SIDE = "resnet18", 96  # the cpu profile's teacher and input size
STORED = 110  # its images' shorter side (the evaluation resize side for 96 px)


@pytest.fixture(scope="module")
def photographs():
    return image_statistics(reference_photographs().values(), resolve(TEACHER).at_input_size(SIDE))


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("photo") / "data"
    write_synthetic_dataset(root, classes=10, train_per_class=1, val_per_class=5, image_size=STORED)
    return image_statistics(load_images(sample_paths(root, "val", per_class=5)), resolve(TEACHER).at_input_size(SIDE))


def test_the_reference_is_eleven_real_photographs(photographs):
    photos = reference_photographs()
    assert len(photos) == 11 and all(p.mode == "RGB" and min(p.size) >= 256 for p in photos.values())
    assert photographs.images == 11 and photographs.side == SIDE
    assert -3.5 < photographs.slope < -2.0  # natural images: power falls about as 1/f^2 to 1/f^3


def test_generated_images_compress_like_photographs(generated, photographs):
    assert generated.images == 50
    for key in ("jpeg_bytes", "webp_bytes"):
        ratio = getattr(generated, key) / getattr(photographs, key)
        assert abs(ratio - 1) <= TOLERANCE, f"{key}: generated {getattr(generated, key):.0f}, " \
                                            f"photographs {getattr(photographs, key):.0f}"
    assert abs(generated.slope - photographs.slope) <= SLOPE_TOLERANCE, (generated.slope, photographs.slope)
    assert generated.matches(photographs)


def test_flat_drawings_do_not_pass_for_photographs(photographs):
    rng = np.random.default_rng(0)
    drawings = []
    for _ in range(5):
        image = np.zeros((STORED, STORED, 3), np.uint8) + rng.integers(0, 256, 3).astype(np.uint8)
        image[30:80, 30:80] = rng.integers(0, 256, 3)
        drawings.append(Image.fromarray(image))
    flat = image_statistics(drawings, resolve(TEACHER).at_input_size(SIDE))
    assert flat.jpeg_bytes < photographs.jpeg_bytes / 2 and not flat.matches(photographs)


@pytest.mark.parametrize("slope", [1.5, 2.0, 3.0])
def test_spectral_slope_recovers_the_slope_of_fractal_noise(slope):
    field = fractal_noise(np.random.default_rng(1), 128, 128, slope=slope)[0]
    image = Image.fromarray(np.clip(128 + 40 * field, 0, 255).astype(np.uint8)).convert("RGB")
    assert spectral_slope(image) == pytest.approx(-slope, abs=0.25)
