"""Deployments of pipeline configs (flows/deploy.py): the `schedule:` block, the run form's
typed parameters and the frozen config path. Built locally: no Prefect server needed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from polyalign.stages.core.errors import ConfigError
from polyalign.stages.core.pipeline import load_pipeline
from tests.conftest import TINY


def _with_schedule(tmp_path: Path, schedule: dict) -> Path:
    data = yaml.safe_load(TINY.read_text())
    data["schedule"] = schedule
    path = tmp_path / "scheduled.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_config_schedule_is_the_default_and_the_command_line_beats_it(tmp_path):
    from polyalign.flows.deploy import describe, schedules

    pipe = load_pipeline(_with_schedule(tmp_path, {"cron": "0 3 * * 1", "timezone": "Europe/Paris", "active": False}), check_models=False)
    (s,) = schedules(pipe, None, None)
    assert (s.cron, s.timezone, s.active) == ("0 3 * * 1", "Europe/Paris", False)
    assert describe(s) == "cron '0 3 * * 1' (Europe/Paris), paused"
    (s,) = schedules(pipe, "*/5 * * * *", None)
    assert s.cron == "*/5 * * * *" and s.active
    (s,) = schedules(pipe, None, 90)
    assert s.interval.total_seconds() == 90
    assert schedules(load_pipeline(TINY, check_models=False), None, None) == []
    (s,) = schedules(load_pipeline(_with_schedule(tmp_path, {"rrule": "FREQ=WEEKLY;BYDAY=MO"}), check_models=False), None, None)
    assert "FREQ=WEEKLY" in s.rrule


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ({"cron": "0 3 * * *", "interval": 60}, "give exactly one of cron, interval, rrule (got cron, interval)"),
        ({"cron": "every day"}, "cron: 'every day' is not a cron expression"),
        ({"interval": 60, "timezone": "Mars/Olympus"}, "timezone: unknown time zone 'Mars/Olympus'"),
        ({"interval": 0}, "schedule.interval"),
    ],
)
def test_a_bad_schedule_block_is_a_one_line_config_error(tmp_path, schedule, expected):
    with pytest.raises(ConfigError) as err:
        load_pipeline(_with_schedule(tmp_path, schedule), check_models=False)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_the_deployment_freezes_the_config_path_and_offers_the_stages_as_choices(tmp_path, monkeypatch):
    from polyalign.flows.deploy import deployment, schedules

    monkeypatch.chdir(TINY.parent)  # a relative path is resolved where the deployment is made
    pipe = load_pipeline(TINY.name, check_models=False)
    dep = deployment(TINY.name, pipe, "tiny", schedules(pipe, "*/5 * * * *", None))
    assert dep.name == "tiny" and dep.flow_name == "polyalign-pipeline"
    assert dep.parameters["config"] == str(TINY.resolve())
    props = dep._parameter_openapi_schema.properties
    assert props["config"]["readOnly"] is True
    choices = [o["enum"] for o in props["until"]["anyOf"] if "enum" in o]
    assert choices == [pipe.order]
    assert set(props) == {"config", "until", "overrides", "concurrency", "store"}
    assert dep.schedules[0].schedule.cron == "*/5 * * * *"


def test_overrides_are_a_list_of_key_value_entries_the_ui_form_can_edit(tmp_path):
    """Prefect 3.8's default UI (V2) draws an array of objects as Add item + one box per
    field; an anyOf with null (a list/None toggle) or a free-form dict it cannot fill in."""
    from polyalign.flows.deploy import deployment

    pipe = load_pipeline(TINY, check_models=False)
    schema = deployment(str(TINY), pipe, "tiny", [])._parameter_openapi_schema
    overrides = schema.properties["overrides"]
    assert "anyOf" not in overrides and overrides["type"] == "array" and overrides["default"] == []
    assert overrides["items"] == {"$ref": "#/definitions/Override"}
    entry = schema.definitions["Override"]
    assert entry["type"] == "object" and entry["required"] == ["key", "value"]
    assert {k: v["type"] for k, v in entry["properties"].items()} == {"key": "string", "value": "string"}
    # the form shows an example (Prefect drops Field(examples=...) from the schema)
    assert "sft.train.max_steps" in overrides["description"] and "20" in overrides["description"]
    assert "sft.train.max_steps" in entry["properties"]["key"]["description"]


@pytest.mark.parametrize(
    "given",
    [
        [{"key": "sft.train.max_steps", "value": "20"}, {"key": "languages", "value": "[fr, de]"}],  # the form's, the API's
        {"sft.train.max_steps": "20", "languages": "[fr, de]"},  # a dict, from Python
        ["sft.train.max_steps=20", "languages=[fr, de]"],  # --set items
    ],
)
def test_overrides_become_the_clis_set_items_whatever_their_shape(given):
    from polyalign.flows.deploy import polyalign_pipeline, set_items

    params = polyalign_pipeline.validate_parameters({"config": str(TINY), "overrides": given})
    assert set_items(params["overrides"]) == ["sft.train.max_steps=20", "languages=[fr, de]"]
    assert set_items(polyalign_pipeline.validate_parameters({"config": str(TINY)})["overrides"]) == []


def test_prefect_yaml_deploys_the_served_flow_with_shipped_configs():
    import importlib

    from tests.conftest import ROOT

    project = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert project["deployments"]
    for dep in project["deployments"]:
        path, func = dep["entrypoint"].split(":")
        module = importlib.import_module("polyalign." + path.removesuffix(".py").replace("/", "."))
        assert getattr(module, func).name == "polyalign-pipeline"
        load_pipeline(ROOT / dep["parameters"]["config"], check_models=False)  # a valid config
        assert dep["work_pool"]["name"] == "polyalign"
