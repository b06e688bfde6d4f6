"""Image decoding (8/16-bit, gray/RGB), normalisation, corrupt files, decompression bombs and augmentation (never
flipped)."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rlhf_rrg.data.annotation import DataError
from rlhf_rrg.data.images import AugmentConfig, augment, load_image, read_grayscale


@pytest.mark.parametrize(
    ("pixels", "suffix", "expected"),
    [
        (np.full((10, 12), 51, np.uint8), ".png", 0.2),
        (np.full((10, 12), 13107, np.uint16), ".png", 0.2),  # 16-bit: 13107 / 65535
        (np.full((10, 12, 3), (255, 0, 0), np.uint8), ".png", 0.299),  # ITU-R 601 luma of pure red
        (np.full((10, 12), 51, np.uint8), ".jpg", 0.2),
    ],
)
def test_read_grayscale(tmp_path: Path, pixels: np.ndarray, suffix: str, expected: float) -> None:
    path = tmp_path / f"img{suffix}"
    Image.fromarray(pixels).save(path)
    array = read_grayscale(path)
    assert array.shape == (10, 12) and array.dtype == np.float32
    np.testing.assert_allclose(array, expected, atol=2 / 255)


def test_load_image_normalises_and_resizes(tmp_path: Path) -> None:
    path = tmp_path / "img.png"
    Image.fromarray(np.full((20, 30), 102, np.uint8)).save(path)
    out = load_image(path, 16, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.1))
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    expected = torch.tensor([(0.4 - 0.1) / 0.5, (0.4 - 0.2) / 0.25, (0.4 - 0.3) / 0.1]).view(3, 1, 1)
    torch.testing.assert_close(out, expected.expand(3, 16, 16), atol=1e-5, rtol=0)


def test_resize_keeps_left_right(tmp_path: Path) -> None:
    pixels = np.zeros((40, 40), np.uint8)
    pixels[:, :20] = 255
    path = tmp_path / "half.png"
    Image.fromarray(pixels).save(path)
    out = load_image(path, 8, mean=(0, 0, 0), std=(1, 1, 1))
    assert out[0, :, :3].min() > 0.99 and out[0, :, 5:].max() < 0.01


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_corrupt_file_names_path(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"broken\.png: cannot decode image"):
        load_image(path, 8)


def test_truncated_png_raises(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match=r"cut\.png"):
        read_grayscale(path)


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.png"):
        read_grayscale(tmp_path / "nope.png")


def test_augment_identity_when_ranges_are_zero() -> None:
    array = np.random.default_rng(0).uniform(size=(32, 32)).astype(np.float32)
    cfg = AugmentConfig(min_crop_scale=1.0, max_rotation_deg=0.0, brightness=0.0, contrast=0.0)
    np.testing.assert_allclose(augment(array, cfg, torch.Generator().manual_seed(0)), array, atol=1e-5)


def test_augment_is_seeded_and_never_flips() -> None:
    array = np.zeros((64, 64), np.float32)
    array[:, :32] = 1.0  # bright patient-right half
    cfg = AugmentConfig()
    a = augment(array, cfg, torch.Generator().manual_seed(1))
    b = augment(array, cfg, torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, array)
    for seed in range(30):
        out = augment(array, cfg, torch.Generator().manual_seed(seed))
        assert out[:, :20].mean() > out[:, 44:].mean() + 0.5, f"seed {seed} moved the bright side"


def test_augment_config_validation() -> None:
    with pytest.raises(ValueError, match="min_crop_scale"):
        AugmentConfig(min_crop_scale=0.0)
    with pytest.raises(ValueError, match="max_rotation_deg"):
        AugmentConfig(max_rotation_deg=90.0)


@pytest.mark.parametrize("side", [10_000, 14_000])  # PIL warns above 89.5M pixels and errors above twice that
def test_decompression_bomb_is_named(tmp_path: Path, side: int) -> None:
    path = tmp_path / "bomb.png"
    Image.new("1", (side, side)).save(path)  # a few kB on disk, side**2 pixels when decoded
    assert path.stat().st_size < 100_000
    with pytest.raises(DataError, match=r"bomb\.png: refused as a possible decompression bomb") as err:
        read_grayscale(path)
    assert err.value.reason == "decompression_bomb"


def test_bombs_are_refused_when_decoded_in_threads(tmp_path: Path) -> None:
    # Datasets decode in a thread pool; a process-wide warning filter toggled per call let some bombs through.
    bomb, ok = tmp_path / "bomb.png", tmp_path / "ok.png"
    Image.new("1", (10_000, 10_000)).save(bomb)  # between 1x and 2x PIL's limit: PIL itself only warns
    Image.new("L", (8, 8)).save(ok)

    def reason(path: Path) -> str:
        try:
            read_grayscale(path)
        except DataError as err:
            return err.reason
        return "decoded"

    with ThreadPoolExecutor(8) as pool:
        reasons = list(pool.map(reason, [bomb, ok] * 8))
    assert reasons == ["decompression_bomb", "decoded"] * 8


def test_decoder_errors_of_any_type_are_named(tmp_path: Path) -> None:
    path = tmp_path / "bad_crc.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the compressed pixel data
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"bad_crc\.png: cannot decode image \(\w+(Error)?: ") as err:
        read_grayscale(path)
    assert err.value.reason == "corrupt_image"
