"""Harmonising a registered dataset onto a data contract: shapes, contract checks, site steps, the cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import RandBiasField

from site_kernel.data import (
    ContractError,
    DatasetNotFound,
    HarmonisationError,
    build_steps,
    generate_demo_hospitals,
    harmonisation_report,
    prepare,
    register_dataset,
    validate_contract,
)
from site_kernel.data.volume import Volume

torch.set_num_threads(1)

CONTRACT = {
    "modality": ["CT", "MR"],
    "dims": 2,
    "size": [48, 48],
    "spacing": [4.0, 4.0],
    "orientation": "RAS",
    "intensity": {"kind": "percentile", "lower": 1.0, "upper": 99.0},
    "labels": {"background": 0, "lesion": 1},
}


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list:
    return generate_demo_hospitals(tmp_path_factory.mktemp("prepare"), n_sites=2, seed=1, scale=0.1, register=True)


def test_prepare_returns_the_contract_s_arrays(sites: list) -> None:
    data = prepare(sites[0].site_dir, CONTRACT, site_steps=sites[0].site_steps)
    assert data.train_x.shape[1:] == (1, 48, 48) and data.train_x.dtype == np.float32
    assert data.train_y.shape[1:] == (48, 48) and data.train_y.dtype == np.int64
    assert data.num_train == len(data.train_x) > 0 and data.num_test == len(data.test_x) > 0
    assert data.train_x.min() >= 0.0 and data.train_x.max() <= 1.0
    assert set(np.unique(np.concatenate([data.train_y, data.test_y]))) == {0, 1}


def test_a_second_prepare_loads_the_cache(sites: list) -> None:
    site = sites[1]
    contract = {**CONTRACT, "size": [40, 40]}
    first = prepare(site.site_dir, contract, site_steps=site.site_steps)
    entry = site.site_dir / "cache" / first.cache_key / "data.npz"
    written = entry.stat().st_mtime_ns
    second = prepare(site.site_dir, contract, site_steps=site.site_steps)
    assert (first.from_cache, second.from_cache) == (False, True)
    assert entry.stat().st_mtime_ns == written
    np.testing.assert_array_equal(first.train_x, second.train_x)
    assert second.stats == first.stats


@pytest.mark.parametrize(
    "change",
    [
        {"contract": {**CONTRACT, "size": [32, 32]}},
        {"site_steps": [{"kind": "denoise", "sigma_mm": 2.0}]},
        {"harmonise": "geometric"},
    ],
)
def test_the_cache_key_covers_contract_site_steps_and_mode(sites: list, change: dict) -> None:
    site = sites[0]
    base = prepare(site.site_dir, CONTRACT, site_steps=site.site_steps)
    changed = prepare(
        site.site_dir,
        change.get("contract", CONTRACT),
        site_steps=change.get("site_steps", site.site_steps),
        harmonise=change.get("harmonise", "full"),
    )
    assert changed.cache_key != base.cache_key and not changed.from_cache


def test_re_registering_with_another_split_invalidates_the_cache(sites: list, tmp_path: Path) -> None:
    site = sites[0]
    register_dataset(tmp_path, "default", site.images_dir, labels=site.labels_dir, seed=0)
    before = prepare(tmp_path, CONTRACT)
    register_dataset(tmp_path, "default", site.images_dir, labels=site.labels_dir, seed=0)
    again = prepare(tmp_path, CONTRACT)
    register_dataset(tmp_path, "default", site.images_dir, labels=site.labels_dir, seed=5)
    after = prepare(tmp_path, CONTRACT)
    assert again.from_cache and again.cache_key == before.cache_key
    assert not after.from_cache and after.cache_key != before.cache_key


def test_site_steps_run_before_the_contract(sites: list) -> None:
    site = sites[0]  # CT: a narrow window changes the harmonised intensities
    wide = prepare(site.site_dir, {**CONTRACT, "intensity": {"kind": "zscore"}}, site_steps=[])
    narrow = prepare(
        site.site_dir,
        {**CONTRACT, "intensity": {"kind": "zscore"}},
        site_steps=[{"kind": "ct_window", "center": 60, "width": 100}],
    )
    assert not np.allclose(wide.train_x, narrow.train_x)
    np.testing.assert_array_equal(wide.train_y, narrow.train_y)


@pytest.mark.parametrize(
    ("contract", "key"),
    [
        ({k: v for k, v in CONTRACT.items() if k != "size"}, "size"),
        ({**CONTRACT, "colour": "blue"}, "colour"),
        ({**CONTRACT, "dims": 3}, "size"),
        ({**CONTRACT, "dims": 4}, "dims"),
        ({**CONTRACT, "size": [64]}, "size"),
        ({**CONTRACT, "size": [64.5, 64]}, "size"),
        ({**CONTRACT, "spacing": [-1.0, 1.0]}, "spacing"),
        ({**CONTRACT, "orientation": "RRS"}, "orientation"),
        ({**CONTRACT, "intensity": {"kind": "histogram"}}, "intensity.kind"),
        ({**CONTRACT, "intensity": {"kind": "percentile", "lower": 99, "upper": 1}}, "intensity.lower"),
        ({**CONTRACT, "intensity": {"kind": "window", "center": 40}}, "intensity.width"),
        ({**CONTRACT, "labels": {"lesion": 1}}, "labels"),
        ({**CONTRACT, "modality": []}, "modality"),
    ],
)
def test_malformed_contracts_are_refused_with_the_key(contract: dict, key: str) -> None:
    with pytest.raises(ContractError) as caught:
        validate_contract(contract)
    assert caught.value.key == key


def test_a_contract_for_another_modality_is_refused(sites: list) -> None:
    with pytest.raises(ContractError, match="holds \\['CT'\\] images") as caught:
        prepare(sites[0].site_dir, {**CONTRACT, "modality": "MR"})
    assert caught.value.key == "modality"


def test_an_unknown_dataset_is_named(sites: list) -> None:
    with pytest.raises(DatasetNotFound, match="'other' is not registered"):
        prepare(sites[0].site_dir, {**CONTRACT, "dataset": "other"})


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([{"kind": "magic"}], "unknown site step 'magic'"),
        ([{"kind": "ct_window", "center": 40}], "needs 'width'"),
        ([{"kind": "ct_window", "center": 40, "width": -5}], "width must be positive"),
        ([{"kind": "denoise", "sigma": 1}], "not \\['sigma'\\]"),
    ],
)
def test_malformed_site_steps_are_refused(steps: list, message: str) -> None:
    with pytest.raises(HarmonisationError, match=message):
        build_steps(steps)


@pytest.mark.parametrize("mode", ["geometric", "none"])
def test_benchmark_modes_keep_raw_intensities(sites: list, mode: str) -> None:
    site = sites[0]  # CT in HU: raw values x 1e-3 reach -1 for air
    data = prepare(site.site_dir, CONTRACT, site_steps=site.site_steps, harmonise=mode)
    assert data.train_x.min() == pytest.approx(-1.0, abs=0.05)
    assert data.train_x.shape[1:] == (1, 48, 48)


def test_an_unknown_mode_is_refused(sites: list) -> None:
    with pytest.raises(ContractError, match="harmonise must be one of"):
        prepare(sites[0].site_dir, CONTRACT, harmonise="some")  # type: ignore[arg-type]


def test_harmonisation_report_is_aggregate_numbers(sites: list) -> None:
    site = sites[1]
    report = harmonisation_report(site.site_dir, CONTRACT, site_steps=site.site_steps)
    assert len(report["before"]["density"]) == 32 and len(report["before"]["edges"]) == 33
    assert report["after"]["edges"][0] >= -1e-6 and report["after"]["edges"][-1] <= 1.0 + 1e-6
    assert report["before"]["percentiles"]["99"] > 100  # MR scanner units before, [0, 1] after
    numbers = json.dumps(report)
    assert "CANARY" not in numbers and str(site.site_dir) not in numbers


def test_bias_field_correction_flattens_a_shaded_volume() -> None:
    rng = np.random.default_rng(0)
    tissue = rng.integers(0, 3, (8, 8, 1)).repeat(8, 0).repeat(8, 1).repeat(4, 2)  # blocks of three tissues
    clean = np.array([100.0, 200.0, 300.0])[tissue].astype(np.float32)
    shading = RandBiasField(degree=2, coeff_range=(0.1, 0.2), prob=1.0)
    shading.set_random_state(seed=1)
    shaded = np.asarray(shading(clean[None]))[0]
    (step,) = build_steps([{"kind": "bias_field_correction"}])
    corrected = step(Volume(shaded, np.eye(4)))

    def spread(values: np.ndarray) -> float:  # mean within-tissue coefficient of variation
        return float(np.mean([values[tissue == t].std() / values[tissue == t].mean() for t in range(3)]))

    assert spread(shaded) > 0.1
    assert spread(corrected) < 0.3 * spread(shaded)
