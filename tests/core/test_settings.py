"""Settings from mappings, the one "did you mean", and the byte units every message uses."""

from __future__ import annotations

import pytest

from lightning_paged.core.errors import SettingError
from lightning_paged.core.optimizers import OptimizerConfig
from lightning_paged.core.paged_optimizer import optimizer_config
from lightning_paged.core.settings import close_matches, did_you_mean, settings_from_mapping
from lightning_paged.core.units import format_bytes, parse_size


def test_a_mapping_becomes_the_validated_dataclass_and_an_unknown_key_is_named():
    assert settings_from_mapping(OptimizerConfig, {"lr": 0.1}, "model.optimizer.") == OptimizerConfig(lr=0.1)
    with pytest.raises(SettingError, match=r"^model\.optimizer\.lrr is not a setting of OptimizerConfig"):
        settings_from_mapping(OptimizerConfig, {"lrr": 0.1}, "model.optimizer.")
    with pytest.raises(SettingError, match=r"^optimizer\.lr must be positive"):
        optimizer_config({"lr": -1.0})


def test_did_you_mean_suggests_only_a_close_choice():
    assert close_matches("paged_adamw_8bt", ["paged_adamw_8bit", "lion"]) == ["paged_adamw_8bit"]
    assert did_you_mean("paged_qlroa", ["paged_qlora", "ddp"]) == " Did you mean 'paged_qlora'?"
    assert did_you_mean("xyz", ["paged_qlora"]) == ""


def test_bytes_are_formatted_in_binary_units():
    assert [format_bytes(n) for n in (None, 0, 1023, 1024, 3 * 2**20, 5 * 2**30, 2**42)] == [
        "n/a",
        "0 B",
        "1023 B",
        "1.0 KiB",
        "3.0 MiB",
        "5.0 GiB",
        "4096.0 GiB",
    ]


def test_sizes_parse_in_decimal_and_binary_units_and_a_bad_one_names_the_setting():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("123") == 123
    assert parse_size(" 1.5 mb ") == 1_500_000
    with pytest.raises(SettingError, match=r"^--max-shard-size must be a size such as 5GB"):
        parse_size("five gigs")
    with pytest.raises(SettingError, match=r"^--max-shard-size must be positive"):
        parse_size("0MB")
