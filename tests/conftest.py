import json
import os
from pathlib import Path

import pytest

# vLLM ships functions to its worker process by pickling (engine_model_stats needs this).
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
# Ray Serve's direct ingress (serve's default request-path profile) holds its replica open for
# 30 s at shutdown, for an external load balancer to deregister it (serve.shutdown then logs
# "Controller failed to shut down within 30.0s"). `serve`'s profiles turn that off for the local
# Ray they start; a `ray start` cluster (the cluster tests, joined with --address) keeps its own
# environment, so set it here too. Inherited by every subprocess and the Ray it starts.
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TABP_VLLM_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def demo_model() -> str:
    from tabp_vllm.models import resolve_model

    return resolve_model("llama")


@pytest.fixture()
def write_mask(tmp_path, demo_model):
    """Write a valid mask for the demo model, optionally corrupting its JSON document."""
    from tabp_vllm.mask import make_mask

    def _write(removed, task="t", edit=None, name="mask.json"):
        doc = make_mask(demo_model, removed, task=task, model_id="llama").to_json()
        if edit:
            edit(doc)
        path = tmp_path / name
        path.write_text(json.dumps(doc))
        return path

    return _write


@pytest.fixture(autouse=True)
def no_ray_driver_left_behind():
    """No test may leave a Ray driver in the pytest process: when its raylet goes away later
    (another test stops a cluster), Ray's core worker ends the whole process with exit code 1
    and no word, and the suite stops mid-run without a summary."""
    import sys

    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail("this test left a Ray driver in the pytest process (ray.shutdown() it)")
