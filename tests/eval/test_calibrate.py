import pytest

import memfit.eval.calibrate as cal
from memfit.kv.policy import parse_policy


def _records(accuracy: dict[str, float], compression: dict[str, float]) -> list[dict]:
    return [{"task": "t", "length": 64, "seed": 0, "policy": spec, "family": spec, "correct": acc, "scores": [acc],
             "compression": compression[spec], "bytes_per_token": 1 / compression[spec]} for spec, acc in accuracy.items()]


def test_calibration_groups_each_family_and_divides_by_none(monkeypatch):
    fams = ("kivi(bits=4,residual=32)", "kvzip(keep={keep})+kivi(bits=4,residual=32)")
    specs = [parse_policy(s).spec for s in ("kivi(bits=4,residual=32)", "kvzip(keep=0.2)+kivi(bits=4,residual=32)",
                                            "kvzip(keep=0.5)+kivi(bits=4,residual=32)")]
    acc = {"none": 0.8, specs[0]: 0.76, specs[1]: 0.6, specs[2]: 0.72}
    comp = {"none": 1.0, specs[0]: 3.3, specs[1]: 16.0, specs[2]: 6.5}
    asked = []
    monkeypatch.setattr(cal, "run_eval", lambda lm, tasks, pols, *a, **k: asked.append(pols) or _records(acc, comp))
    lm = type("LM", (), {"name": "m"})()
    table = cal.calibrate(lm, ["t"], 64, 1, families=fams, keeps=(0.2, 0.5))
    assert asked == [["none", *specs]]
    assert table.families[0].points == ((3.3, 0.95),)
    assert table.families[1].points == ((6.5, 0.9), (16.0, 0.75))
    assert table.source["none_accuracy"] == 0.8 and table.to_dict()["families"][1]["template"] == fams[1]
    acc = {k: 0.0 for k in acc}
    with pytest.raises(ValueError, match="answered nothing right"):
        cal.calibrate(lm, ["t"], 64, 1, families=fams, keeps=(0.2, 0.5))
    with pytest.raises(ValueError, match="keeps in"):
        cal.calibrate(lm, ["t"], 64, 1, keeps=(1.5,))


def test_the_shipped_table_measures_the_families_calibrate_runs():
    """The planner's table is what ``memfit calibrate`` writes: a family added to (or dropped from)
    FAMILIES without calibrating again would leave the planner choosing among stale ones."""
    from memfit.kv.plan import load_calibration

    table = load_calibration()
    assert table is not None and [f.template for f in table.families] == list(cal.FAMILIES)
    for f in table.families:  # every keep measured (a fixed family: its one point)
        assert len(f.points) == (len(cal.KEEPS) if f.free else 1)
