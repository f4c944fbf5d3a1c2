"""Batching settings files: the CRD's keys, partial updates, and errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from fleet_spec.contract import BatchSettings, SettingsError, load_batching_file


def test_yaml_and_json_files_set_the_crd_keys(tmp_path: Path) -> None:
    yaml_file = tmp_path / "batching.yaml"
    yaml_file.write_text("maxBatchSize: 4\nmaxQueueDelayMicroseconds: 500\n")
    settings = load_batching_file(yaml_file, BatchSettings(max_queue_size=10))
    assert settings == BatchSettings(max_batch_size=4, max_queue_delay_us=500, max_queue_size=10)
    json_file = tmp_path / "batching.json"
    json_file.write_text('{"batching": {"maxQueueSize": 17}}')
    assert load_batching_file(json_file, BatchSettings()).max_queue_size == 17


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("maxBatchSize: 0", "maxBatchSize: must be between 1 and 256, got 0"),
        ("maxQueueSize: big", "maxQueueSize: must be an integer"),
        ("maxBatchSiz: 4", "unknown keys ['maxBatchSiz']"),
        ("- 1", "expected a mapping"),
        ("maxBatchSize: [", "cannot read batching settings"),
        ("maxBatchSize: 16\nmaxQueueSize: 8", "maxQueueSize: must be >= maxBatchSize (16)"),
    ],
)
def test_bad_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "batching.yaml"
    path.write_text(text)
    with pytest.raises(SettingsError) as caught:
        load_batching_file(path, BatchSettings())
    assert message in str(caught.value)
    assert str(path) in str(caught.value)
