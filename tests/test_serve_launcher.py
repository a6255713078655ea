"""tabp_vllm/serve/launcher.py without Ray: options checked at construction, the config file the
child reads, READY / an early exit / a timeout, a clean stop. A real `tabp-vllm serve` child where
it stops before Ray (the memory check); a stand-in child where the test needs a slow or READY one.
The full path (Ray, engines, READY, Ctrl-C) is tests/test_serve.py's shared server."""

from __future__ import annotations

import sys

import pytest
from pydantic import ValidationError

from tabp_vllm.errors import TabpError
from tabp_vllm.serve.launcher import ServeProcess, config_yaml
from tabp_vllm.serve.options import ServeOptions, VariantOptions, load_yaml_spec

# a stand-in for `tabp-vllm serve`: its first line, then READY, then waits for Ctrl-C
READY_CHILD = """
import signal, sys, time
print("dtype: float32 (test)", flush=True)
print("READY http://127.0.0.1:8000", flush=True)
try:
    time.sleep(120)
except KeyboardInterrupt:
    print("stopped", flush=True)
"""


def test_bad_options_fail_at_construction(tmp_path):
    with pytest.raises(ValidationError):
        ServeOptions(port="eighty")
    with pytest.raises(ValidationError):
        ServeOptions(no_such_option=1)
    with pytest.raises(TypeError, match="needs ServeOptions"):
        ServeProcess({"port": 8000}, tmp_path / "serve.log")
    missing = ServeOptions(variants=[VariantOptions(mask=str(tmp_path / "nope.json"))])
    with pytest.raises(TabpError, match="nope.json"):
        ServeProcess(missing, tmp_path / "serve.log")
    with pytest.raises(TabpError, match="nothing to serve"):
        ServeProcess(ServeOptions(dense=False), tmp_path / "serve.log")
    assert not list(tmp_path.iterdir())  # nothing written, nothing started


def test_config_file_round_trips_and_names(tmp_path, write_mask, monkeypatch):
    mask = write_mask([20, 21, 22], task="gsm8k")
    monkeypatch.chdir(tmp_path)  # a relative mask path is this process' working directory's
    options = ServeOptions(variants=[VariantOptions(mask=mask.name), VariantOptions(
        mask=mask.name, task="math", name="small")], port=8123, metrics_port=8124,
        api_key="k", engine={"kv_cache_gib": 0.25, "max_model_len": 512, "extra": {"max_num_seqs": 8}},
        request_path={"ingress_replicas": 2})
    server = ServeProcess(options, tmp_path / "logs" / "serve.log")
    assert server.variant_names == ["llama", "llama-gsm8k", "small"]
    assert server.model_names == server.variant_names and server.routed_name is None
    assert server.base_url == "http://127.0.0.1:8123"
    assert server.metrics_url == "http://127.0.0.1:8124/metrics"
    assert server.headers == {"Authorization": "Bearer k"}
    assert server.records_path == tmp_path / "logs" / "serve.ray.log"  # beside the console's log
    assert options.log_file is None  # the caller's options are not changed
    path = tmp_path / "other" / "serve.yaml"  # read from elsewhere: the mask paths are absolute
    path.parent.mkdir()
    path.write_text(config_yaml(server.options))
    again = ServeOptions.model_validate(load_yaml_spec(path))
    assert again.variants[0].mask == str(mask)
    assert again.model_dump(exclude={"variants"}) == server.options.model_dump(exclude={"variants"})
    assert again.log_file == str(server.records_path)
    assert [(v.task, v.name) for v in again.variants] == [(None, None), ("math", "small")]
    joined = ServeProcess(ServeOptions(address="127.0.0.1:6379", host="0.0.0.0"), tmp_path / "j.log")
    assert joined.metrics_url is None and joined.base_url == "http://127.0.0.1:8000"
    assert ServeProcess(ServeOptions(verbose=True), tmp_path / "v.log").records_path is None


def test_a_child_that_exits_before_ready_raises_with_its_log(tmp_path):
    # a real `tabp-vllm serve` that reads the config file and stops at its memory check
    options = ServeOptions(port=8125, engine={"kv_cache_gib": 100000})
    server = ServeProcess(options, tmp_path / "serve.log", ready_timeout_s=120)
    with pytest.raises(TabpError) as err:
        with server:
            pytest.fail("READY without an engine")
    msg = str(err.value)
    assert "exited with code 2 before it was ready" in msg and str(server.log_path) in msg
    assert "its log ends:\n  | dtype:" in msg  # the tail, from the first line the child printed
    assert "GiB" in msg and "available" in msg  # ... to its error line
    assert server.returncode == 2 and server.left == []


def test_timeout_stops_the_child(tmp_path):
    server = ServeProcess(ServeOptions(), tmp_path / "serve.log", ready_timeout_s=1, stop_grace_s=10)
    server.proc.cmd = [sys.executable, "-c", "import time; print('dtype: x', flush=True); time.sleep(60)"]
    with pytest.raises(TabpError, match=r"not ready within 1 s .*its log ends:\n  \| dtype: x"):
        with server:
            pass
    assert server.returncode is not None  # stopped, not left behind


def test_ready_then_a_clean_stop(tmp_path):
    server = ServeProcess(ServeOptions(), tmp_path / "serve.log", ready_timeout_s=60)
    server.proc.cmd = [sys.executable, "-c", READY_CHILD]
    with server:
        assert server.ready_line() == "READY http://127.0.0.1:8000"
        assert server.returncode is None
        assert server.config_path.stat().st_mode & 0o777 == 0o600  # it may hold the API key
    assert server.left == [] and server.returncode == 0
    assert server.log_text().rstrip().endswith("stopped")
    assert server.stop() == []  # a second stop does nothing
