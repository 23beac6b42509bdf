"""Job files: TOML -> frozen dataclasses, unknown keys rejected with a suggestion, errors naming file and field."""

from __future__ import annotations

import dataclasses

import pytest

from foldcp_hpc.config import ConfigError, GridConfig, JobConfig, RuntimeConfig, load_job, parse_overrides
from conftest import REPO


def write(tmp_path, text):
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


def test_demo_job_loads():
    job = load_job(REPO / "jobs" / "demo.toml")
    assert job.grid == GridConfig(cp=None, dp=1)
    assert job.runtime.backend == "auto"
    assert job.source.endswith("demo.toml")


def test_defaults_without_a_file_and_frozen():
    job = load_job(None)
    assert job == JobConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.grid.p = 3  # type: ignore[misc]


def test_overrides_win_over_the_file(tmp_path):
    path = write(tmp_path, "[grid]\ncp = 2\n[runtime]\nbackend = 'gloo'\n")
    job = load_job(path, ["grid.cp=3", "runtime.timeout_s=30", "runtime.self_check=false"])
    assert job.grid.cp == 3 and job.runtime == RuntimeConfig(backend="gloo", timeout_s=30.0, self_check=False)


def test_parse_overrides_reads_toml_values_and_bare_words():
    assert parse_overrides(["grid.cp=3", "runtime.backend=gloo", "runtime.backend=\"host\""]) == {
        "grid": {"cp": 3}, "runtime": {"backend": "host"}}
    with pytest.raises(ConfigError, match="override 'p=3' must look like section.key=value"):
        parse_overrides(["p=3"])


@pytest.mark.parametrize("text,message", [
    ("[grid]\ncpp = 2\n", "job.toml: [grid] has no key 'cpp'; did you mean 'cp'?"),
    ("[grdi]\ncp = 2\n", "job.toml: unknown section [grdi]; did you mean 'grid'?"),
    ("[runtime]\nbackend = 'ncl'\n", "job.toml: [runtime] backend: 'ncl' is not one of auto, nccl, gloo, host"),
    ("[grid]\ncp = 'two'\n", "job.toml: [grid] cp: expected an integer, got 'two'"),
    ("[grid]\ncp = 0\n", "job.toml: [grid] cp: must be positive, got 0"),
    ("[grid]\ndp = true\n", "job.toml: [grid] dp: expected an integer, got True"),
    ("[runtime]\ntimeout_s = -1\n", "job.toml: [runtime] timeout_s: must be positive, got -1.0"),
    ("[runtime]\nself_check = 1\n", "job.toml: [runtime] self_check: expected true or false, got 1"),
    ("grid = 3\n", "job.toml: 'grid' must be a table [grid], got 3"),
    ("[grid\n", "job.toml: not valid TOML"),
])
def test_bad_job_files_get_one_line_naming_file_and_field(tmp_path, text, message):
    with pytest.raises(ConfigError) as info:
        load_job(write(tmp_path, text))
    assert message in str(info.value)
    assert "\n" not in str(info.value).strip()


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml: no such job file"):
        load_job(tmp_path / "nope.toml")


def test_every_field_is_documented():
    for cls in (GridConfig, RuntimeConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f"{cls.__name__}.{f.name} has no doc"
