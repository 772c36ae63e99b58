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
    from memfit.kv.plan import CALIBRATION_FILE, read_tables

    tables = read_tables(CALIBRATION_FILE)
    assert tables
    for table in tables:  # one a context length
        assert [f.template for f in table.families] == list(cal.FAMILIES)
        for f in table.families:  # every keep measured (a fixed family: its one point)
            assert len(f.points) == (len(cal.KEEPS) if f.free else 1)


def test_calibrate_add_keeps_the_tables_of_other_lengths(tmp_path, monkeypatch):
    """``memfit calibrate --add`` writes its table beside those --out holds for other lengths (one of
    the same length replaced); without --add the file is that one table; a file that is not a table
    fails before the measuring starts."""
    import json

    from typer.testing import CliRunner

    import memfit.cli as cli
    from memfit.kv.plan import Calibration, Family, load_calibration

    def fake(lm, tasks, length, samples, seed, out_dir=None):
        return Calibration((Family("kivi(bits=4,residual=32)", ((3.3, 0.9 + length / 1e5),)),), {"length": length})

    monkeypatch.setattr(cal, "calibrate", fake)
    monkeypatch.setattr(cli, "_load", lambda model: object())
    out = tmp_path / "cal.json"
    run = lambda *a: CliRunner().invoke(cli.app, ["calibrate", "-o", str(out), *a])  # noqa: E731
    assert run("-n", "1024").exit_code == 0 and "tables" not in json.loads(out.read_text())
    assert run("-n", "4096", "--add").exit_code == 0
    assert run("-n", "4096", "--add").exit_code == 0  # the same length again: replaced, not doubled
    assert [t["length"] for t in json.loads(out.read_text())["tables"]] == [1024, 4096]
    assert load_calibration(out, num_tokens=5000).families[0].points == ((3.3, 0.9 + 4096 / 1e5),)
    assert run("-n", "2048").exit_code == 0 and json.loads(out.read_text())["length"] == 2048  # no --add: replaced
    out.write_text("{}")
    r = run("-n", "1024", "--add")
    assert r.exit_code == 2 and "not a memfit calibration table" in r.output
    out.write_text(json.dumps({"families": [{"template": "kivi(bits=4,residual=32)", "points": [[3.3, 0.9]]}]}))
    r = run("-n", "1024", "--add")  # a table that does not say its length cannot be kept beside another
    assert r.exit_code == 2 and "context length" in r.output and "tables" not in json.loads(out.read_text())
