"""projects.json: the scheduling settings `order` and `weight`, checked with errors that name file and field."""

from __future__ import annotations

import json

import pytest

from dispatch.cluster.config import load_project_config
from dispatch.core.errors import ConfigError
from dispatch.core.settings import get_settings


def _write(entry: dict) -> None:
    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    (settings.home / "projects.json").write_text(json.dumps({"shop": entry}))


def test_the_default_order_is_by_path_and_the_weight_one() -> None:
    _write({"sync_mode": "scp"})

    config = load_project_config(get_settings(), "shop")

    assert (config.order, config.weight) == ("path", 1.0)


def test_order_priority_and_a_weight_are_read() -> None:
    _write({"order": "priority", "weight": 2})

    config = load_project_config(get_settings(), "shop")

    assert (config.order, config.weight, config.options) == ("priority", 2.0, {})


@pytest.mark.parametrize(("entry", "field"), [({"order": "fifo"}, "shop.order"), ({"order": 1}, "shop.order"),
                                              ({"weight": 0}, "shop.weight"), ({"weight": "2"}, "shop.weight"),
                                              ({"weight": True}, "shop.weight"), ({"weight": 1000}, "shop.weight")])
def test_a_bad_order_or_weight_names_the_file_and_field(entry: dict, field: str) -> None:
    _write(entry)

    with pytest.raises(ConfigError) as caught:
        load_project_config(get_settings(), "shop")

    assert "projects.json" in str(caught.value) and f"{field}:" in str(caught.value)
