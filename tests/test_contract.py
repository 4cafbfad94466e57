"""The stage contract: dvc.yaml is the contracts' rendering, code deps follow the imports, a stage reads only
what it declares, and a new stage needs only its file and its conf group."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, compose, make_project, sh
from pipeline import dvcgen
from pipeline.stage import ContractError, Input, Plot, Stage, execute, load, stage_names

# What each shared module's edit must rerun, written from what each stage runs (not computed), so a wrong
# closure fails here: the drift the issue found (ppo/grpo without preferences.py, collect/evaluate without the
# training lifecycle, quantize without the evaluation library) among them.
STALE_AFTER_EDIT = {
    "pipeline/preferences.py": {"reward", "dpo", "ppo", "grpo", "evaluate"},  # evaluate: the reward score via online
    "pipeline/training.py": {"base", "sft", "reward", "dpo", "ppo", "grpo", "quantize", "distill", "classify",
                             "evaluate", "register"},  # register: the served guard's classifier module imports it
    "pipeline/classification.py": {"classify", "evaluate", "register"},  # evaluate, register: the guard
    "pipeline/serving.py": {"register"},  # the served model's code, logged with it
    "pipeline/judges.py": {"collect", "ppo", "grpo", "quantize", "distill", "evaluate"},
    "pipeline/evaluation.py": {"quantize", "distill", "evaluate"},
    "pipeline/packing.py": {"sft", "quantize", "distill"},  # quantize: QAT fine-tunes on the packed SFT data
    "pipeline/runs.py": set(),  # declared in dvcgen.NOT_DEPS: records runs, changes no output
}


def test_the_committed_dvc_yaml_is_the_rendering_of_the_contracts():
    from pipeline.run import load_params

    rendered = dvcgen.render(load_params(str(ROOT / "params.yaml"), []))
    assert (ROOT / "dvc.yaml").read_text() == rendered, "dvc.yaml is stale: run `python -m pipeline.dvcgen`"


def test_every_stage_declares_its_contract_and_no_stage_imports_another():
    names = stage_names()
    assert names[:13] == ["base", "prepare", "sft", "collect", "reward", "dpo", "ppo", "grpo", "quantize", "distill",
                          "classify", "evaluate", "register"]
    for name in names:
        assert load(name).name == name
    found = subprocess.run(["grep", "-rn", "from stages\\|import stages", "pipeline", "stages"], cwd=ROOT,
                           capture_output=True, text=True).stdout
    assert found == ""


def test_code_deps_are_the_import_closure_including_lazy_imports():
    deps = {name: set(dvcgen.code_deps(load(name))) for name in stage_names()}
    for module, stages in STALE_AFTER_EDIT.items():
        assert {name for name, files in deps.items() if module in files} == stages, module
    assert dvcgen.code_deps(load("sft"))[0] == "stages/sft.py"
    assert "stages/evaluate.py" not in deps["quantize"]


def test_a_stage_reading_an_undeclared_key_fails_naming_it(in_tmp):
    def run(ctx):
        return {"seed": ctx.cfg.seed, "arch": ctx.cfg.model.arch.hidden_size}  # model.arch is not declared

    sneaky = Stage(name="prepare", run=run, params=("model.name_or_path",))
    with pytest.raises(ContractError, match="'model.arch'.*does not declare"):
        execute(sneaky, compose("stage=prepare", "experiment=smoke"))
    assert not (in_tmp / "data" / "prepare").exists()  # nothing half-written


@dataclass
class ToyConfig:
    """A toy stage's own group: how many lines of the prepared prompts to count."""

    lines: int = 3


def count_prompts(ctx) -> dict:
    """The toy stage: copy the first ``toy.lines`` prepared prompts and count their characters."""
    rows = (ctx.input("prepare") / "prompts.jsonl").read_text().splitlines()[:ctx.config.lines]
    (ctx.output / "head.jsonl").write_text("\n".join(rows) + "\n")
    ctx.write_plot("sizes.json", [{"row": i, "chars": len(r)} for i, r in enumerate(rows)])
    return {"toy/rows": len(rows), "toy/chars": sum(map(len, rows))}


TOY = Stage(name="toy", run=count_prompts, inputs=(Input("prepare", "prepare", dataset=True),),
            params=("data.max_tokens",), plots=(Plot("sizes.json", x="row", y="chars"),), config=ToyConfig)


def test_a_new_stage_runs_through_the_contract_and_renders_its_dvc_entry(smoke_chain, in_tmp):
    import shutil

    from omegaconf import OmegaConf

    from pipeline.outputs import read_json

    shutil.copytree(smoke_chain / "data" / "prepare", in_tmp / "data" / "prepare")
    cfg = compose("stage=prepare", "experiment=smoke")
    cfg = OmegaConf.merge(OmegaConf.to_container(cfg), {"stage": "toy", "toy": {"lines": 2}})
    metrics = execute(TOY, cfg)
    assert metrics["toy/rows"] == 2
    assert read_json(in_tmp / "data" / "metrics" / "toy.json") == metrics
    assert len((in_tmp / "data" / "toy" / "head.jsonl").read_text().splitlines()) == 2
    run = read_json(in_tmp / "data" / "toy" / "run.json")
    assert run["stage"] == "toy" and run["inputs"]["prepare"]["run_id"]  # lineage to the prepare run
    entry = "\n".join(dvcgen.stage_yaml(TOY, cfg))
    assert "      - tests/test_contract.py\n" in entry and "      - pipeline/stage.py\n" in entry
    assert "      - data/prepare\n    params:\n      - seed\n      - toy\n      - data.max_tokens\n" in entry
    assert "      - data/plots/toy/sizes.json:\n          cache: false\n          x: row\n" in entry


def lookup(params: dict, key: str):
    """``params["a"]["b"]`` for ``key`` ``a.b`` (how DVC resolves ``${a.b}`` in dvc.yaml from params.yaml)."""
    for part in key.split("."):
        params = params[part]
    return params


def test_editing_a_shared_module_makes_exactly_the_stages_that_run_it_stale(tmp_path):
    """Real DVC: every output stands in as committed, then one module at a time is edited."""
    project = make_project(tmp_path / "project")
    spec = yaml.safe_load((project / "dvc.yaml").read_text())
    params = yaml.safe_load((project / "params.yaml").read_text())
    for stage in spec["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                path = project / (entry if isinstance(entry, str) else next(iter(entry)))
                if kind == "outs":
                    path.mkdir(parents=True, exist_ok=True)
                    (path / "model.bin").write_text(path.name)
                else:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text("{}\n")
        for dep in stage["deps"]:
            path = project / re.sub(r"\$\{([^}]+)\}", lambda m: str(lookup(params, m.group(1))), dep)
            if not path.exists():
                path.write_text("{}\n")
    sh("dvc", "commit", "-f", "-q", cwd=project)

    def stale() -> set[str]:
        out = sh("dvc", "status", "--json", cwd=project).stdout
        return set(json.loads(out or "{}"))

    assert stale() == set()
    for module, expected in STALE_AFTER_EDIT.items():
        path = project / module
        original = path.read_text()
        path.write_text(original + "\n# an edit\n")
        assert stale() == expected, module
        path.write_text(original)
    assert stale() == set()


def test_dvcgen_check_names_a_stale_dvc_yaml(tmp_path):
    project = make_project(tmp_path / "project")
    dvc_yaml = project / "dvc.yaml"
    dvc_yaml.write_text(dvc_yaml.read_text().replace("      - pipeline/preferences.py\n", "", 1))
    proc = sh(sys.executable, "-m", "pipeline.dvcgen", "--check", cwd=project, check=False)
    assert proc.returncode == 1 and "differs from the stage contracts at line" in proc.stderr
    assert "wrote dvc.yaml" in sh(sys.executable, "-m", "pipeline.dvcgen", cwd=project).stdout
    # Rewritten, it is the committed file again, which the first test checks against the contracts in-process.
    assert Path(project / "dvc.yaml").read_text() == (ROOT / "dvc.yaml").read_text()


@pytest.mark.slow  # five pipeline subprocesses, each paying the import of lightning and transformers
def test_the_readme_recipe_adds_a_stage_with_one_file_and_one_conf_group(smoke_chain, tmp_path):
    """The README's "add a stage" section, followed literally in a fresh copy of the project."""
    import re
    import shutil

    project = make_project(tmp_path / "project", "experiment=smoke")
    for stage in ("base", "prepare"):
        shutil.copytree(smoke_chain / "data" / stage, project / "data" / stage)
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("**Add a stage**"):readme.index("## Orchestration cookbook")]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (project / "stages" / "count.py").write_text(code)
    (project / "conf" / "count").mkdir()
    (project / "conf" / "count" / "default.yaml").write_text("lines: 5   # prompts counted\n")
    config = project / "conf" / "config.yaml"
    config.write_text(config.read_text().replace("  - evaluate: default\n", "  - evaluate: default\n  - count: default\n"))
    sh(sys.executable, "-m", "pipeline.compose", "experiment=smoke", cwd=project)
    sh(sys.executable, "-m", "pipeline.dvcgen", cwd=project)
    entry = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]["count"]
    assert entry["deps"][0] == "stages/count.py" and "data/prepare" in entry["deps"]
    assert entry["params"][:3] == ["seed", "count", "data.max_tokens"]
    sh(sys.executable, "-m", "pipeline.run", "--params", "params.yaml", "stage=count", cwd=project)
    assert json.loads((project / "data" / "metrics" / "count.json").read_text()) == {"count/rows": 5}
    sh(sys.executable, "-m", "pipeline.run", "--params", "params.yaml", "stage=prepare", "prepare.histogram_bins=3",
       cwd=project)  # the other stages still run beside the added group
    bad = sh(sys.executable, "-m", "pipeline.run", "--params", "params.yaml", "stage=count", "count.lines=many",
             cwd=project, check=False)
    assert bad.returncode == 2 and "count.lines" in bad.stderr
