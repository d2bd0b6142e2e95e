import os
import sys

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


@pytest.fixture(autouse=True, scope="module")
def _fresh_model_cache_per_module():
    """Give every test module the process-wide model cache as it found it.

    ``fedlora.models.get_lora_model`` keeps one PEFT model per process and tests change its
    adapters (values, ranks, Opacus hooks); entries a module adds are dropped when it ends, so
    no module depends on what an earlier one left behind (any order, any subset).
    """
    models = sys.modules.get("fedlora.models")
    before = dict(models._CACHE) if models is not None else {}
    yield
    models = sys.modules.get("fedlora.models")
    if models is not None:
        models._CACHE.clear()
        models._CACHE.update(before)


@pytest.fixture
def task_identity():
    """Set Flower's process-global ``TaskIdentity`` as a runtime would, and restore it afterwards.

    Flower stamps every ``Message`` it builds with the running task's identity (class
    attributes); calling a ClientApp in-process needs one, and later tests must not inherit it.
    """
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield TaskIdentity
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
