"""The compiled Kubeflow pipeline (the IR YAML the cluster reads), and the argument handling of
`python -m pipelines submit`. kfp.local ignores images, accelerators and every kfp-kubernetes
setting, so this is where they are checked."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml

from components import EXIT_TASK, STEP_FUNCTIONS, build_components, rima_image
from components.image import DEFAULT_IMAGE, IMAGE_ENV
from pipelines.cli import main
from pipelines.compile import compile_pipeline, pipeline_arguments
from pipelines.rima_pipeline import (
    CACHED_TASKS,
    DEFAULT_RESOURCES,
    GPU_TASKS,
    RETRIED_TASKS,
    SECRET_ENV_KEYS,
    ClusterOptions,
    TaskResources,
    Toleration,
    quantity,
    with_resources,
)
from pipelines.submit import build_submission, package_parameters, parse_arguments
from rima_core.config import Config
from tests.git_helpers import git

IMAGE = "registry.example.org/rima/rima:9.9.9"
SECRET = "rima-test-credentials"
STEPS = [name.replace("_", "-") for name in STEP_FUNCTIONS]


def _params(tmp: Path) -> tuple[Path, Path]:
    values = Config().to_dict()
    values["tune"]["n_trials"] = 17
    values["tune"]["workers"] = 3
    values["mlflow"]["tracking_uri"] = "http://mlflow.mlflow.svc:5000"
    params = tmp / "params.yaml"
    params.write_text("# a comment and\n# several lines\n" + yaml.safe_dump(values))
    profile = tmp / "profile.yaml"
    profile.write_text("train:\n  epochs: 2\npromote:\n  margin: 0.01\n")
    return params, profile


def _load(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert len(docs) == 2, "pipeline spec + kubernetes platform spec"
    return docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("kfp")
    params, profile = _params(tmp)
    options = ClusterOptions(
        image=IMAGE,
        secret_name=SECRET,
        gpu_type="nvidia.com/gpu",
        gpu_count=2,
        gpu_tolerations=(Toleration.parse("nvidia.com/gpu:NoSchedule"),),
        gpu_node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        gpu_memory_request="32Gi",
        tune_parallelism=2,
    )
    out = compile_pipeline(
        tmp / "rima_pipeline.yaml", params, profile, ["train.lr=0.002"], options=options
    )
    spec, platform = _load(out)
    return {"path": out, "spec": spec, "platform": platform, "params": params}


def _tasks(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every task of every DAG (root, loop, conditions), by task name."""
    out = dict(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():
        out.update(comp.get("dag", {}).get("tasks", {}))
    return out


def _executor(spec: dict[str, Any], task: dict[str, Any]) -> str:
    return spec["components"][task["componentRef"]["name"]]["executorLabel"]


def test_every_step_is_a_task_on_the_project_image(compiled: dict[str, Any]) -> None:
    spec = compiled["spec"]
    tasks = _tasks(spec)
    assert set(STEPS) <= set(tasks)
    executors = spec["deploymentSpec"]["executors"]
    exit_task = EXIT_TASK.name.replace("_", "-")  # the exit handler's task runs no step
    assert {f"exec-{s}" for s in [*STEPS, exit_task]} == set(executors)
    for name, ex in executors.items():
        container = ex["container"]
        assert container["image"] == IMAGE, name
        script = " ".join(container["command"] + container.get("args", []))
        assert "pip install" not in script, f"{name} installs packages at run time"


def test_dag_edges(compiled: dict[str, Any]) -> None:
    tasks = _tasks(compiled["spec"])

    def deps(name: str) -> set[str]:
        return set(tasks[name].get("dependentTasks", []))

    assert deps("resolve-config") == set()  # the DAG's root
    assert deps("fetch-raw") == {"resolve-config"}
    assert "fetch-raw" in deps("prepare")
    assert "prepare" in deps("validate")
    assert {"prepare", "validate"} <= deps("simulate-missing")  # no masks for a bad store
    loop = next(t for t in tasks.values() if t["taskInfo"]["name"] == "tune-workers")
    loop_name = next(k for k, t in tasks.items() if t is loop)
    assert loop["parameterIterator"]["items"]["inputParameter"].startswith(
        "pipelinechannel--resolve-config-Output"
    )
    assert (
        "tune-worker"
        in compiled["spec"]["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    )
    assert loop_name in deps("tune-best")
    assert {"tune-best", "simulate-missing", "prepare"} <= deps("train")
    assert "train" in deps("evaluate")
    assert {"evaluate", "train"} <= deps("register")
    # register applies promote.register_min_metric itself; promote only after a registration
    gate = next(t for t in tasks.values() if t["taskInfo"]["name"] == "registered")
    assert "register" in gate["dependentTasks"]
    condition = gate["triggerPolicy"]["condition"]
    assert "pipelinechannel--register-Output" in condition and "!=" in condition
    gate_dag = compiled["spec"]["components"][gate["componentRef"]["name"]]["dag"]["tasks"]
    promote_gate = next(t for t in gate_dag.values() if t["taskInfo"]["name"] == "auto-promote")
    assert "auto_promote" in promote_gate["triggerPolicy"]["condition"]
    # promote waits for its version: the enclosing "registered" condition depends on register
    promote_dag = compiled["spec"]["components"][promote_gate["componentRef"]["name"]]["dag"]
    assert "promote" in promote_dag["tasks"]
    version = tasks["promote"]["inputs"]["parameters"]["version"]
    assert version["componentInputParameter"] == "pipelinechannel--register-Output"


def test_gpu_requests_tolerations_and_node_selectors(compiled: dict[str, Any]) -> None:
    executors = compiled["spec"]["deploymentSpec"]["executors"]
    platform = compiled["platform"]
    gpu = {f"exec-{t.replace('_', '-')}" for t in GPU_TASKS}
    assert gpu == {"exec-train", "exec-tune-worker"}
    for name, ex in executors.items():
        resources = ex["container"].get("resources", {})
        if name in gpu:
            acc = resources["accelerator"]
            assert acc["resourceType"] == "nvidia.com/gpu" and int(acc["resourceCount"]) == 2
            assert resources["memoryRequest"] == pytest.approx(34.359738368)  # 32Gi in GB
            tol = platform[name]["tolerations"]
            assert tol == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
            selector = platform[name]["nodeSelector"]["labels"]
            assert selector == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        else:
            assert "accelerator" not in resources, name
            assert "tolerations" not in platform.get(name, {}), name
            assert "nodeSelector" not in platform.get(name, {}), name


def test_credentials_come_from_the_secret_never_from_parameters(compiled: dict[str, Any]) -> None:
    spec, platform = compiled["spec"], compiled["platform"]
    for name in spec["deploymentSpec"]["executors"]:
        if name == "exec-resolve-config":
            assert "secretAsEnv" not in platform.get(name, {})
            continue
        (entry,) = platform[name]["secretAsEnv"]
        assert entry["secretName"] == SECRET and entry["optional"] is True
        mapped = {m["envVar"]: m["secretKey"] for m in entry["keyToEnv"]}
        assert mapped == {k: k for k in SECRET_ENV_KEYS}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD"} <= set(
            mapped
        )
    words = ("secret", "password", "token", "access_key", "credential")
    for param in spec["root"]["inputDefinitions"]["parameters"]:
        assert not any(w in param.lower() for w in words), param


def test_retries_and_caching(compiled: dict[str, Any]) -> None:
    tasks = _tasks(compiled["spec"])
    for step in STEP_FUNCTIONS:
        task = tasks[step.replace("_", "-")]
        retry = task.get("retryPolicy")
        if step in RETRIED_TASKS:
            assert retry["maxRetryCount"] == 3 and retry["backoffDuration"] == "30s", step
        else:
            assert retry is None, step
        cached = task.get("cachingOptions", {}).get("enableCache", False)
        assert cached == (step in CACHED_TASKS), step
    assert {"prepare", "validate", "simulate_missing"} <= set(CACHED_TASKS)
    assert not {"register", "promote", "train", "tune_worker"} & set(CACHED_TASKS)
    assert {"register", "promote", "tune_worker"} <= set(RETRIED_TASKS)
    loop = next(t for t in tasks.values() if t["taskInfo"]["name"] == "tune-workers")
    assert loop["iteratorPolicy"]["parallelismLimit"] == 2


def test_parameters_mirror_params_yaml(compiled: dict[str, Any]) -> None:
    params = compiled["spec"]["root"]["inputDefinitions"]["parameters"]
    assert params["tune_trials"]["defaultValue"] == 17
    assert params["tune_workers"]["defaultValue"] == 3
    assert params["mlflow_tracking_uri"]["defaultValue"] == "http://mlflow.mlflow.svc:5000"
    assert params["promote_margin"]["defaultValue"] == 0.01  # from the profile
    carried = yaml.safe_load(params["params_yaml"]["defaultValue"])
    assert carried == yaml.safe_load(compiled["params"].read_text())
    profile = yaml.safe_load(params["profile_yaml"]["defaultValue"])
    assert profile == {"train": {"epochs": 2, "lr": 0.002}, "promote": {"margin": 0.01}}
    assert "\n" not in params["params_yaml"]["defaultValue"]  # kfp's header needs one line
    for name in ("data_source_uri", "missing_sweep", "missing_mixed", "missing_rate"):
        assert name in params


def test_pipeline_arguments_reject_typos(tmp_path: Path) -> None:
    from rima_core.config import ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match="unknown key"):
        pipeline_arguments(None, bad)
    assert pipeline_arguments(None)["params_yaml"] == "{}"


def test_cpu_only_compile_has_no_accelerators(tmp_path: Path) -> None:
    out = tmp_path / "cpu.yaml"
    # an explicitly named params file must exist: exit 2 with a message, no package
    assert main(["compile", "--params", "none.yaml", "--out", str(out)]) == 2
    assert not out.exists()
    argv = ["compile", "--out", str(out), "--no-gpu", "--image", IMAGE]
    # the checkout's params.yaml logs to sqlite:///mlflow.db: private to each pod, refused
    assert main(argv) == 2 and not out.exists()
    assert main([*argv, "--set", "mlflow.tracking_uri=http://mlflow.svc:5000"]) == 0
    spec, platform = _load(out)
    for name, ex in spec["deploymentSpec"]["executors"].items():
        assert "accelerator" not in ex["container"].get("resources", {}), name
        assert "tolerations" not in platform.get(name, {}), name


def test_cli_compile_options(tmp_path: Path) -> None:
    out = tmp_path / "p.yaml"
    argv = ["compile", "--out", str(out), "--image", IMAGE, "--gpus", "4"]
    argv += ["--allow-local-mlflow"]  # a shared volume: warned, compiled
    argv += ["--gpu-toleration", "pool=gpu:NoExecute", "--gpu-node-selector", "pool=a100"]
    assert main(argv) == 0
    spec, platform = _load(out)
    acc = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert int(acc["accelerator"]["resourceCount"]) == 4
    assert platform["exec-train"]["tolerations"] == [
        {"key": "pool", "operator": "Equal", "value": "gpu", "effect": "NoExecute"}
    ]
    assert main(["compile", "--out", str(out), "--gpu-toleration", ":x"]) == 2
    assert main(["compile", "--out", str(out), "--gpu-node-selector", "nokey"]) == 2
    assert main(["compile", "--out", str(tmp_path / "p.txt")]) == 2


def test_toleration_parsing() -> None:
    assert Toleration.parse("nvidia.com/gpu") == Toleration("nvidia.com/gpu", effect=None)
    assert Toleration.parse("a=b") == Toleration("a", "Equal", "b", None)
    with pytest.raises(ValueError, match="effect must be"):
        Toleration.parse("a:Sometimes")


def test_image_is_chosen_in_one_place(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(IMAGE_ENV, raising=False)
    assert rima_image() == DEFAULT_IMAGE
    monkeypatch.setenv(IMAGE_ENV, IMAGE)
    assert rima_image() == IMAGE and build_components().prepare.component_spec
    assert build_components().image == IMAGE
    assert rima_image("x.io/a/b@sha256:" + "0" * 64).endswith("0" * 64)
    with pytest.raises(ValueError, match="no tag"):
        rima_image("x.io/rima")
    assert DEFAULT_IMAGE.rsplit(":", 1)[1] != "latest"


def test_components_are_thin_wrappers_over_steps() -> None:
    for name, func in STEP_FUNCTIONS.items():
        source = inspect.getsource(func)
        if name != "resolve_config":
            assert "steps." in source, f"{name} must delegate to rima_core.pipeline.steps"
        # everything a component uses is imported inside it: only its source reaches the pod
        assert "from rima_core" in source, name


# --- submit: argument handling (no server) ----------------------------------------------------


def test_submit_arguments_are_typed_from_the_package(compiled: dict[str, Any]) -> None:
    types = package_parameters(compiled["path"])
    assert types["tune_workers"] == "NUMBER_INTEGER" and types["missing_sweep"] == "LIST"
    args = parse_arguments(
        [
            "data_source_uri=s3://bucket/fairvision/v1",
            "tune_workers=4",
            "missing_sweep=[0, 0.5, 1]",
            "auto_promote=false",
            "register_min_metric=0.3",
            "mlflow_experiment=2025",  # a STRING stays verbatim, never a number
        ],
        types,
    )
    assert args == {
        "data_source_uri": "s3://bucket/fairvision/v1",
        "tune_workers": 4,
        "missing_sweep": [0, 0.5, 1],
        "auto_promote": False,
        "register_min_metric": 0.3,
        "mlflow_experiment": "2025",
    }
    for bad, match in [
        ("tune_workers=four", "expected an integer"),
        ("auto_promote=maybe", "expected true/false"),
        ("missing_sweep=0.5", "expected a list"),
        ("tune_wrokers=4", "no such parameter"),
        ("tune_workers", "name=value"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_arguments([bad], types)


def test_submission_takes_token_and_host_from_env(compiled: dict[str, Any]) -> None:
    env = {"KF_PIPELINES_TOKEN": "tok", "KF_PIPELINES_ENDPOINT": "https://kfp.example.org"}
    sub = build_submission(compiled["path"], "rima", argument_pairs=["tune_workers=2"], env=env)
    assert sub.token == "tok" and sub.host == "https://kfp.example.org"
    assert sub.arguments == {"tune_workers": 2}
    assert "tok" not in repr(sub)  # never logged
    explicit = build_submission(compiled["path"], "rima", host="http://127.0.0.1:8888", env={})
    assert explicit.host == "http://127.0.0.1:8888" and explicit.token is None
    with pytest.raises(ValueError, match="experiment"):
        build_submission(compiled["path"], "", env={})
    with pytest.raises(ValueError, match="--wait"):
        build_submission(compiled["path"], "rima", wait_s=-1, env={})


def test_submit_cli_fails_clearly_before_any_network_call(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["submit", "--package", str(missing), "--experiment", "e"]) == 2
    not_a_package = tmp_path / "x.yaml"
    not_a_package.write_text("a: 1\n")
    assert main(["submit", "--package", str(not_a_package), "--experiment", "e"]) == 2
    with pytest.raises(SystemExit):  # argparse: --experiment is required
        main(["submit", "--package", str(not_a_package)])


# --- resources, tracking URI ------------------------------------------------------------------


def test_every_task_has_cpu_and_memory(compiled: dict[str, Any]) -> None:
    """One table of steps: DEFAULT_RESOURCES covers exactly the steps, and every compiled task
    carries requests and a memory limit (GPU tasks too, with the GPU override applied)."""
    assert set(DEFAULT_RESOURCES) == set(STEP_FUNCTIONS)
    executors = compiled["spec"]["deploymentSpec"]["executors"]
    for step, res in DEFAULT_RESOURCES.items():
        got = executors[f"exec-{step.replace('_', '-')}"]["container"]["resources"]
        assert got["resourceCpuRequest"] == res.cpu, step
        assert got["resourceMemoryLimit"] == res.memory_limit, step
        want_memory = "32Gi" if step in GPU_TASKS else res.memory  # the fixture's --gpu-memory
        assert got["resourceMemoryRequest"] == want_memory, step


def test_task_resources_overrides_and_checks(tmp_path: Path) -> None:
    assert quantity("500m") == 0.5 and quantity("2Gi") == 2 * 2**30 and quantity("1G") == 1e9
    table = with_resources(DEFAULT_RESOURCES, ["train:cpu=8,memory=40Gi,memory_limit=64Gi"])
    assert table["train"] == TaskResources("8", "40Gi", None, "64Gi")
    assert table["prepare"] == DEFAULT_RESOURCES["prepare"]
    for bad, match in [
        ("trian:cpu=1", "no step 'trian'"),
        ("train:gpu=1", "is not one of"),
        ("train", "expected STEP:"),
    ]:
        with pytest.raises(ValueError, match=match):
            with_resources(DEFAULT_RESOURCES, [bad])
    with pytest.raises(ValueError, match="unknown step"):
        ClusterOptions(resources={"nope": TaskResources("1")})

    out = tmp_path / "r.yaml"
    argv = ["compile", "--out", str(out), "--image", IMAGE, "--no-gpu"]
    argv += ["--set", "mlflow.tracking_uri=https://mlflow.example.org"]
    assert main([*argv, "--task-resources", "evaluate:cpu=3,cpu_limit=6,memory=12Gi"]) == 0
    spec, _ = _load(out)
    res = spec["deploymentSpec"]["executors"]["exec-evaluate"]["container"]["resources"]
    assert res["resourceCpuRequest"] == "3" and res["resourceCpuLimit"] == "6"
    assert res["resourceMemoryRequest"] == "12Gi"
    # a request above its limit would only fail when the pod starts: refused at compile time
    out.unlink()
    assert main([*argv, "--task-resources", "evaluate:memory=64Gi"]) == 2
    assert main([*argv, "--task-resources", "evaluate:cpu=x"]) == 2
    assert not out.exists()


def test_compile_refuses_a_pod_local_tracking_store(tmp_path: Path) -> None:
    from pipelines.compile import check_cluster_tracking
    from rima_core.config import ConfigError

    for uri in ("sqlite:///mlflow.db", "file:///tmp/mlruns", "mlruns"):
        with pytest.raises(ConfigError, match="private to each pod"):
            compile_pipeline(tmp_path / "p.yaml", None, None, [f"mlflow.tracking_uri={uri}"])
        check_cluster_tracking(uri, allow_local=True)  # warns only
    assert not (tmp_path / "p.yaml").exists()
    for uri in ("http://mlflow:5000", "https://mlflow.example.org", "databricks"):
        check_cluster_tracking(uri)


def test_every_task_has_a_display_name_and_a_deadline(compiled: dict[str, Any]) -> None:
    """What the KFP UI shows, and a pod deadline so a hung task fails instead of holding its
    node (Kubernetes activeDeadlineSeconds, from components.tasks.TASKS)."""
    from components.tasks import TASKS

    tasks = _tasks(compiled["spec"])
    executors = compiled["platform"]  # the kubernetes executors (see _load)
    for spec in TASKS:
        task = tasks[spec.name.replace("_", "-")]
        assert spec.display_name and task["taskInfo"]["name"] == spec.display_name
        assert spec.timeout_s > 0
        config = executors[_executor(compiled["spec"], task)]
        assert int(config["activeDeadlineSeconds"]) == spec.timeout_s, spec.name


# --- params.yaml against the committed one ---------------------------------------------------


def test_compile_warns_when_params_differ_from_the_committed_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The package's defaults come from params.yaml as it is on disk: a cluster run from an
    edited, uncommitted file would use values no commit records, so compile names the keys."""
    import logging
    import shutil

    from pipelines.compile import uncommitted_params

    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    values = Config().to_dict()
    values["mlflow"]["tracking_uri"] = "http://mlflow.mlflow.svc:5000"
    params = repo / "params.yaml"
    params.write_text(yaml.safe_dump(values))
    git(repo, "add", "params.yaml")
    git(repo, "commit", "-q", "-m", "params")
    # the same values, reformatted and commented: nothing differs
    params.write_text("# tuned by hand\n" + yaml.safe_dump(values, sort_keys=False, indent=4))
    assert uncommitted_params(params) == []

    values["train"]["epochs"] = 3
    values["validate"]["min_split_fraction"]["val"] = 0.1  # nested: named to the leaf
    values["missing"]["sweep"] = [0.5]  # lists are values
    del values["promote"]["tolerance"]  # set on one side only
    params.write_text(yaml.safe_dump(values))
    with caplog.at_level(logging.WARNING, logger="pipelines.compile"):
        compile_pipeline(tmp_path / "p.yaml", params)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    keys = "missing.sweep, promote.tolerance, train.epochs, validate.min_split_fraction.val"
    assert f"in {keys};" in warnings[0]
    assert "HEAD:params.yaml" in warnings[0]
    assert (tmp_path / "p.yaml").is_file()  # a warning, not a refusal

    # outside a git work tree there is nothing to compare with: silence
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copyfile(params, outside / "params.yaml")
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="pipelines.compile"):
        compile_pipeline(tmp_path / "q.yaml", outside / "params.yaml")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert uncommitted_params(outside / "params.yaml") is None
    # a file HEAD does not hold (never committed) is not compared either
    (repo / "other.yaml").write_text(yaml.safe_dump(values))
    assert uncommitted_params(repo / "other.yaml") is None
