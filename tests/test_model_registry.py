"""The champion alias of the MLflow model registry: on the registered version with the best validation AUC.
(Logging a trained model and loading it back runs in test_bundle, on a real training.)"""

import math

from bundle.model_registry import AUC_TAG, CHAMPION, promote_if_best
from bundle.tracking import open_run, tracking_client, tracking_uri


def test_the_champion_alias_moves_only_to_a_better_validation_auc(tmp_path):
    uri = tracking_uri(tmp_path)
    client = tracking_client(uri)
    client.create_registered_model("resnet18-softcam")

    def register(auc: float) -> tuple[str, bool]:
        """A new version of a training run with this validation AUC, as log_trained_model registers it."""
        run_id = open_run(uri, "softcam", "training")
        version = client.create_model_version("resnet18-softcam", f"runs:/{run_id}/model", run_id=run_id).version
        client.set_model_version_tag("resnet18-softcam", version, AUC_TAG, str(auc))
        return str(version), promote_if_best(client, "resnet18-softcam", version, auc)

    assert register(0.70) == ("1", True)  # the first version of a name is the champion
    assert register(0.60) == ("2", False)
    assert register(0.70) == ("3", False)  # a tie keeps the champion
    assert register(math.nan) == ("4", False)  # no AUC (one class in validation) never displaces one
    assert str(client.get_model_version_by_alias("resnet18-softcam", CHAMPION).version) == "1"
    assert register(0.90) == ("5", True)
    assert str(client.get_model_version_by_alias("resnet18-softcam", CHAMPION).version) == "5"
