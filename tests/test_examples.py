"""Every example config starts with the command that runs it and is a valid run configuration."""

from pathlib import Path

import pytest

from potstill.flags import read_settings_file
from trainer_client.config import TrainConfig

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_a_valid_config_that_states_its_command(path):
    assert path.read_text().splitlines()[0] == f"# potstill train --config examples/{path.name}"
    config = TrainConfig(**read_settings_file(path))
    assert "~" not in config.student and config.steps > 0


def test_there_are_examples():
    assert len(EXAMPLES) >= 3
