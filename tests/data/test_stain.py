"""Stain normalisation on synthetic two-stain tiles built by Beer-Lambert from known stain vectors, its bad
references, and its reference's round trip through a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.color import rgb2lab, rgb_from_hed

from cdcl.checkpoint import lean_payload, load_checkpoint, save_checkpoint
from cdcl.data.stain import StainNormalizer, estimate_profile, fit_reference
from cdcl.errors import CdclError


def unit(v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


REFERENCE_STAINS = np.stack([unit(rgb_from_hed[0]), unit(rgb_from_hed[1])])  # Ruifrok-Johnston H and E
OTHER_LAB_STAINS = np.stack([unit([0.45, 0.80, 0.40]), unit([0.20, 0.90, 0.40])])  # 14 and 19 degrees away


def two_stain_tile(stains: np.ndarray, amounts, seed: int, side: int = 128) -> np.ndarray:
    """Beer-Lambert: a quarter of the pixels pure haematoxylin, a quarter pure eosin, a quarter mixed, a quarter
    white background; each stain's amount scaled by ``amounts``."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 4, side * side)
    conc = np.zeros((side * side, 2))
    conc[kind == 0, 0] = rng.uniform(0.2, 1.2, np.count_nonzero(kind == 0))
    conc[kind == 1, 1] = rng.uniform(0.2, 1.0, np.count_nonzero(kind == 1))
    conc[kind == 2] = rng.uniform(0.1, 0.8, (np.count_nonzero(kind == 2), 2))
    rgb = 256 * np.exp(-(conc * amounts) @ stains) - 1
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8).reshape(side, side, 3)


REFERENCE = two_stain_tile(REFERENCE_STAINS, [1.0, 1.0], seed=0)
OTHER_LAB = two_stain_tile(OTHER_LAB_STAINS, [0.6, 1.4], seed=1)


def test_macenko_finds_the_stain_vectors_a_tile_was_made_of() -> None:
    np.testing.assert_allclose(estimate_profile("macenko", [REFERENCE])["stains"], REFERENCE_STAINS, atol=0.01)
    np.testing.assert_allclose(estimate_profile("macenko", [OTHER_LAB])["stains"], OTHER_LAB_STAINS, atol=0.01)


def test_macenko_maps_another_labs_tile_to_the_reference_stain_vectors_and_amounts() -> None:
    normalize = fit_reference("macenko", [REFERENCE], "labeled.txt")
    out = estimate_profile("macenko", [normalize(OTHER_LAB)])
    np.testing.assert_allclose(out["stains"], normalize.reference["stains"], atol=0.01)
    np.testing.assert_allclose(out["amounts"], normalize.reference["amounts"], rtol=0.03)


def test_reinhard_maps_another_labs_tile_to_the_reference_lab_statistics() -> None:
    normalize = fit_reference("reinhard", [REFERENCE], "labeled.txt")
    out = estimate_profile("reinhard", [normalize(OTHER_LAB)])
    np.testing.assert_allclose(out["mean"], normalize.reference["mean"], atol=1.0)
    # within 10%: recoloured pixels leave the RGB gamut (clipped) and some cross the tissue threshold
    np.testing.assert_allclose(out["std"], normalize.reference["std"], rtol=0.1)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_normalising_the_reference_leaves_it_unchanged(method) -> None:
    normalize = fit_reference(method, [REFERENCE], "labeled.txt")
    diff = np.abs(normalize(REFERENCE).astype(int) - REFERENCE)
    assert diff.max() <= 1 and diff.mean() < 0.05


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_a_fixed_source_profile_normalises_as_the_image_own_estimate(method) -> None:
    normalize = fit_reference(method, [REFERENCE], "labeled.txt")
    np.testing.assert_array_equal(normalize.with_source([OTHER_LAB])(OTHER_LAB), normalize(OTHER_LAB))


BAD_REFERENCES = {
    "blank": (np.full((128, 128, 3), 255, np.uint8), "too little tissue"),
    "one-colour": (np.full((128, 128, 3), (150, 60, 170), np.uint8), "single colour"),
    "grey": (np.repeat(np.tile(np.arange(40, 200, dtype=np.uint8), (128, 1))[..., None], 3, axis=2), "single colour"),
}


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
@pytest.mark.parametrize("case", list(BAD_REFERENCES))
def test_a_reference_from_a_blank_or_non_he_tile_is_a_one_line_error(method, case) -> None:
    image, problem = BAD_REFERENCES[case]
    with pytest.raises(CdclError) as err:
        fit_reference(method, [image], "split/labeled.txt")
    assert str(err.value).startswith("split/labeled.txt: data.stain_norm=") and problem in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_an_image_without_a_stain_profile_is_left_as_it_is(method) -> None:
    normalize = fit_reference(method, [REFERENCE], "labeled.txt")
    for image, _ in BAD_REFERENCES.values():
        assert normalize(image) is image
        assert normalize.with_source([image]) is None


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_the_reference_round_trips_through_both_checkpoints(tmp_path, method) -> None:
    normalize = fit_reference(method, [REFERENCE], "labeled.txt")
    payload = {"weights": {"student": {}}, "stain": normalize.to_dict()}
    save_checkpoint(tmp_path / "last.pt", payload)
    save_checkpoint(tmp_path / "best.pt", lean_payload(payload))
    for name in ("last.pt", "best.pt"):
        back = StainNormalizer.from_dict(load_checkpoint(tmp_path / name)["stain"])
        assert back.method == method
        np.testing.assert_array_equal(back(OTHER_LAB), normalize(OTHER_LAB))


@pytest.mark.parametrize(
    "stored",
    [
        None,
        {"method": "vahadane", "reference": {}},
        {"method": "macenko", "reference": {"mean": [0, 0, 0], "std": [1, 1, 1]}},
        {"method": "macenko", "reference": {"stains": [[1, 0, 0]], "amounts": [1, 1]}},
        {"method": "reinhard", "reference": {"mean": [0, 0, float("nan")], "std": [1, 1, 1]}},
    ],
)
def test_a_malformed_stored_reference_is_refused(stored) -> None:
    with pytest.raises(ValueError):
        StainNormalizer.from_dict(stored)


def test_normalised_images_keep_their_shape_and_type_and_lab_lightness_order() -> None:
    out = fit_reference("macenko", [REFERENCE], "labeled.txt")(OTHER_LAB)
    assert out.shape == OTHER_LAB.shape and out.dtype == np.uint8
    before, after = rgb2lab(OTHER_LAB)[..., 0].ravel(), rgb2lab(out)[..., 0].ravel()
    assert np.corrcoef(before, after)[0, 1] > 0.9  # recoloured, not scrambled
