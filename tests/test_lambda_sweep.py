import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from lambda_sweep import choose  # noqa: E402


def _row(lambda1, auc, precision):
    return {"lambda1": lambda1, "auc": auc, "activation_precision": precision}


def test_the_sparse_value_is_the_most_precise_that_keeps_dense_softcams_auc():
    table = [_row("0", 0.975, 0.045), _row("1e-2", 0.936, 0.090), _row("3e-2", 0.990, 0.040), _row("1e-1", 0.970, 0.042)]
    # 1e-2 localises best but loses 0.039 AUC; dense SoftCAM is not a sparse model
    assert choose(table, auc_tolerance=0.01)["lambda1"] == "1e-1"
    assert choose(table, auc_tolerance=0.05)["lambda1"] == "1e-2"
    assert choose(table, auc_tolerance=0.0)["lambda1"] == "3e-2"


def test_without_a_value_that_keeps_the_auc_the_best_auc_wins_and_a_dense_only_sweep_is_an_error():
    assert choose([_row("0", 0.99, 0.1), _row("1e-2", 0.90, 0.3), _row("1e-1", 0.95, 0.2)], 0.01)["lambda1"] == "1e-1"
    with pytest.raises(ValueError, match="no lambda1 > 0"):
        choose([_row("0", 0.99, 0.1)], 0.01)
