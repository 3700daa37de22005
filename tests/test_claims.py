"""SoftCAM's claim against the CAM family, computed from the comparison's rows."""

from bundle.explain.claims import verdicts, write_claims


def _rows():
    def method(name, family, shape, ap, pxap, audc):
        return {"method": name, "kind": "method", "family": family, "raw_map_shape": shape,
                "activation_precision": ap, "pxap": pxap, "deletion_audc": audc}

    return [
        method("black box + Grad-CAM", "cam", "8x8", 0.20, 0.30, 0.40),
        method("black box + dual branch + CAM", "cam", "8x8", 0.25, 0.28, 0.45),
        method("black box + Guided Backprop", "gradient", "128x128", 0.90, 0.90, 0.10),  # not a CAM: not a rival
        method("sparse SoftCAM", "self-explaining", "16x16", 0.30, 0.29, 0.35),
        {"method": "ideal map at 16x16", "kind": "ideal", "raw_map_shape": "16x16", "activation_precision": 0.57,
         "pxap": 0.80},
        {"method": "ideal map at 8x8", "kind": "ideal", "raw_map_shape": "8x8", "activation_precision": 0.28,
         "pxap": 0.50},
    ]


def test_each_column_is_answered_against_the_best_cam_row_with_both_ceilings():
    found = {v["column"]: v for v in verdicts(_rows())}
    assert found["activation precision"]["beats"] is True  # 0.30 > 0.25, the dual-branch CAM row
    assert found["activation precision"]["rival"] == "black box + dual branch + CAM"
    assert (found["activation precision"]["ceiling"], found["activation precision"]["rival_ceiling"]) == (0.57, 0.28)
    assert found["PxAP"]["beats"] is False and found["PxAP"]["rival_value"] == 0.30  # 0.29 < 0.30
    assert found["deletion AUDC"]["beats"] is True and found["deletion AUDC"]["rival_value"] == 0.40  # lower is better


def test_the_written_answers_follow_the_figures(tmp_path):
    text = write_claims(tmp_path / "claims.md", _rows()).read_text()
    assert ("sparse SoftCAM, PxAP: **no**, 0.290 against 0.300 for the best CAM-family row (black box + Grad-CAM; "
            "difference -0.0100)") in text
    assert "ideal map 0.800 at 16x16, 0.500 at the CAM row's 8x8" in text
    assert "sparse SoftCAM: yes on 2 of 3 columns." in text
    rows = _rows()
    rows[3]["pxap"] = 0.31
    assert "sparse SoftCAM: yes on 3 of 3 columns." in write_claims(tmp_path / "again.md", rows).read_text()


def test_without_a_cam_family_row_nothing_is_answered(tmp_path):
    rows = [r for r in _rows() if r.get("family") != "cam"]
    text = write_claims(tmp_path / "claims.md", rows).read_text()
    assert "**yes**" not in text and "**no**" not in text and "not measured" in text
