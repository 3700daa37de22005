"""On/off settings given on the command line.

``python -m monai.bundle run`` parses ``--resume false`` with fire, which turns ``False`` into a bool
but leaves ``false`` (JSON's spelling, the one the configs use) a string, and a non-empty string is
true: the setting would silently do the opposite. The configs pass each user-facing on/off id through
``flag`` before using it.
"""

TRUE = ("true", "yes", "on", "1")
FALSE = ("false", "no", "off", "0")


def flag(value, name: str) -> bool:
    """``value`` (a bool, 0 / 1, or one of true/false, yes/no, on/off, 1/0 in any case) as a bool;
    ValueError naming the setting ``name`` for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
        return value.strip().lower() in TRUE
    raise ValueError(f"--{name} takes true or false, got {value!r}")
