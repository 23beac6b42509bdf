"""docs/config.md is the rendering of the job-file dataclasses, and every field is in it (serial)."""

from __future__ import annotations

import dataclasses

from foldcp_hpc.config import SECTIONS, load_job
from foldcp_hpc.config_docs import REGENERATE, render_config_doc
from conftest import REPO


def test_docs_config_md_is_current():
    committed = (REPO / "docs" / "config.md").read_text()
    assert committed == render_config_doc(), (
        f"docs/config.md differs from foldcp_hpc/config.py's dataclasses; regenerate it: `{REGENERATE}` "
        "(from the repository root, with the project's venv)")


def test_every_field_has_a_row_with_its_doc_and_bound():
    text = render_config_doc()
    for name, cls in SECTIONS.items():
        section = text.split(f"## [{name}]\n", 1)[1].split("\n## ", 1)[0]
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f"{cls.__name__}.{f.name} has no doc"
            row = next((line for line in section.splitlines() if line.startswith(f"| `{f.name}` |")), None)
            assert row is not None, f"[{name}] {f.name} has no row"
            assert " ".join(f.metadata["doc"].split()).replace("<", "&lt;") in row
            check = f.metadata.get("check")
            if check is not None:  # a lambda's bound could not be printed: checks must say what they allow
                assert getattr(check, "allowed", None), f"[{name}] {f.name}: its check has no `allowed` text"
                assert f"| {check.allowed} |" in row


def test_rendered_defaults_and_choices():
    text = render_config_doc()
    assert "| `backend` | string | `\"auto\"` | `auto`, `nccl`, `gloo`, `host` |" in text
    assert "| `cp` | integer or unset | unset | > 0 |" in text
    assert "| `sampling_steps` | integer | `200` | >= 2 |" in text
    assert "| `self_check` | boolean | `true` | `true`, `false` |" in text


def test_the_pages_override_example_loads():
    job = load_job(REPO / "jobs" / "demo.toml", ["sampling.diffusion_samples=5", "runtime.backend=gloo"])
    assert (job.sampling.diffusion_samples, job.runtime.backend) == (5, "gloo")
    assert "jobs/demo.toml sampling.diffusion_samples=5 runtime.backend=gloo" in render_config_doc()
