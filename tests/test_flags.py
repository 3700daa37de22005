"""On/off settings from the command line: ``--resume false`` must mean false."""

import pytest
from monai.bundle import ConfigParser

from bundle.flags import flag
from tests.conftest import ROOT


@pytest.mark.parametrize("value", [True, 1, "true", "True", "YES", "on", "1"])
def test_true_spellings(value):
    assert flag(value, "resume") is True


@pytest.mark.parametrize("value", [False, 0, "false", "False", "no", "OFF", "0"])
def test_false_spellings(value):
    assert flag(value, "resume") is False


@pytest.mark.parametrize("value", ["ture", "", 2, None, 0.5])
def test_anything_else_is_an_error_naming_the_setting(value):
    with pytest.raises(ValueError, match="--all_classes takes true or false"):
        flag(value, "all_classes")


def _parsed(config: str, overrides: dict, key: str):
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / config))
    parser.update(overrides)
    return parser.get_parsed_content(key)


@pytest.mark.parametrize("given, expected", [("false", False), ("true", True), (False, False)])
def test_configs_read_the_command_lines_spelling(given, expected):
    """fire hands ``--resume false`` over as the string "false": each user-facing on/off id reads it as false."""
    assert _parsed("train.json", {"resume": given}, "resuming") is expected
    assert _parsed("train.json", {"amp": given}, "use_amp") is expected
    inference = {"resume": given, "all_classes": given, "ckpt_path": "missing.pt"}
    assert _parsed("inference.json", inference, "inference#resume") is expected
    assert _parsed("inference.json", inference, "inference#all_classes") is expected
