"""How much the generated images look like photographs, to a codec and to a spectrum.

Image codecs and learned bottlenecks are compared fairly only on images with the statistics
of photographs: images that are too simple make JPEG and WebP look better than they are. The
reference is the set of real photographs that ship inside installed packages (scikit-image's
sample data, matplotlib's sample photograph), so the comparison needs no download. Each image
is measured as the network sees it (the evaluation crop of the teacher at the profile's input
size) by three numbers: its JPEG bytes at quality 75, its WebP bytes at quality 50, and the
log-log slope of its radially averaged power spectrum (about -2 to -3 for natural images).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import numpy as np
from PIL import Image

from hnd.codec import encode_image
from hnd.registry import ModelSpec

# scikit-image's sample photographs of scenes, objects and surfaces (not its drawings, text,
# microscopy or telescope images), and matplotlib's portrait: eleven photographs in all.
SKIMAGE_PHOTOGRAPHS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "gravel", "moon", "rocket")
MOTORCYCLE = "motorcycle"  # the left view of scikit-image's stereo pair
MATPLOTLIB_PHOTOGRAPH = "grace_hopper"
JPEG_QUALITY, WEBP_QUALITY = 75, 50
TOLERANCE = 0.25  # generated medians within ±25% of the photographs' in bytes
SLOPE_TOLERANCE = 0.3  # and within ±0.3 in spectral slope


def reference_photographs() -> dict[str, Image.Image]:
    """The eleven photographs (RGB; grey ones as three equal channels), by name."""
    import matplotlib
    import skimage.data

    arrays = {name: getattr(skimage.data, name)() for name in SKIMAGE_PHOTOGRAPHS}
    arrays[MOTORCYCLE] = skimage.data.stereo_motorcycle()[0]
    out = {}
    for name, array in sorted(arrays.items()):
        array = np.stack([array] * 3, axis=-1) if array.ndim == 2 else array[..., :3]
        out[name] = Image.fromarray(array.astype(np.uint8))
    path = Path(matplotlib.get_data_path()) / "sample_data" / f"{MATPLOTLIB_PHOTOGRAPH}.jpg"
    with Image.open(path) as image:
        out[MATPLOTLIB_PHOTOGRAPH] = image.convert("RGB")
    return out


def spectral_slope(image: Image.Image) -> float:
    """The slope of log power against log spatial frequency, radially averaged, of the image's
    luminance (Hann-windowed; frequencies from 2 cycles per image to Nyquist)."""
    grey = np.asarray(image.convert("L"), dtype=np.float64)
    grey = (grey - grey.mean()) * np.outer(np.hanning(grey.shape[0]), np.hanning(grey.shape[1]))
    power = np.abs(np.fft.fftshift(np.fft.fft2(grey))) ** 2
    y, x = np.indices(power.shape)
    radius = np.hypot(x - power.shape[1] // 2, y - power.shape[0] // 2).astype(int)
    radial = np.bincount(radius.ravel(), power.ravel()) / np.maximum(np.bincount(radius.ravel()), 1)
    frequencies = np.arange(2, min(power.shape) // 2)
    return float(np.polyfit(np.log(frequencies), np.log(radial[frequencies]), 1)[0])


@dataclass(frozen=True)
class ImageStatistics:
    """Medians over a set of images, each measured in its evaluation crop."""

    images: int
    side: int  # pixels of the square crop
    jpeg_bytes: float  # at quality JPEG_QUALITY
    webp_bytes: float  # at quality WEBP_QUALITY
    slope: float  # spectral_slope

    def matches(self, reference: ImageStatistics) -> bool:
        """Within the tolerances of ``reference`` (the photographs) on all three numbers."""
        return (abs(self.jpeg_bytes / reference.jpeg_bytes - 1) <= TOLERANCE
                and abs(self.webp_bytes / reference.webp_bytes - 1) <= TOLERANCE
                and abs(self.slope - reference.slope) <= SLOPE_TOLERANCE)


def measure(image: Image.Image) -> tuple[int, int, float]:
    """(JPEG bytes, WebP bytes, spectral slope) of one image as given (already cropped)."""
    rgb = image.convert("RGB")
    return (len(encode_image(rgb, "jpeg", JPEG_QUALITY)), len(encode_image(rgb, "webp", WEBP_QUALITY)),
            spectral_slope(rgb))


def image_statistics(images: Iterable[Image.Image], spec: ModelSpec) -> ImageStatistics:
    """The medians of :func:`measure` over ``images``, each in the evaluation crop of the model
    ``spec`` at its input size (resize, then centre crop, as the network reads it)."""
    geometry = spec.preprocessing().geometry()
    rows = [measure(geometry(image.convert("RGB"))) for image in images]
    if not rows:
        raise ValueError("no images to measure")
    jpeg, webp, slope = zip(*rows)
    return ImageStatistics(len(rows), spec.input_size, float(median(jpeg)), float(median(webp)), float(median(slope)))


def sample_paths(root: str | Path, split: str = "val", per_class: int = 5) -> list[Path]:
    """The first ``per_class`` images of every class of a dataset folder's ``split``."""
    folders = sorted(p for p in (Path(root) / split).iterdir() if p.is_dir())
    return [path for folder in folders for path in sorted(folder.iterdir())[:per_class]]


def load_images(paths: Sequence[str | Path]) -> list[Image.Image]:
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def codec_bytes(images: Iterable[Image.Image], spec: ModelSpec, codec: str,
                qualities: Sequence[int]) -> dict[int, float]:
    """Quality -> the median bytes of ``images`` in the evaluation crop of the model ``spec``,
    encoded with ``codec`` at that quality."""
    geometry = spec.preprocessing().geometry()
    crops = [geometry(image.convert("RGB")) for image in images]
    return {q: float(median(len(encode_image(crop, codec, q)) for crop in crops)) for q in qualities}
