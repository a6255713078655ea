"""`make demo`'s choice of k and its summary line, on the files its commands write (the demo
itself takes ~12 minutes: it is run from a fresh clone before a release, not in `make test`)."""

import json

import pytest

from tabp_vllm import demo


@pytest.mark.parametrize("acc,want", [
    ({None: 0.70, 2: 0.69, 4: 0.64, 6: 0.50}, 4),   # 0.64 >= 0.9 * 0.70 = 0.63
    ({None: 0.70, 2: 0.69, 4: 0.62, 6: 0.66}, 2),   # stops at the first miss: k = 6's 0.66 is noise
    ({None: 0.70, 2: 0.55, 4: 0.50, 6: 0.40}, 2),   # none keeps it: the smallest, said so
])
def test_choose_k_keeps_the_largest_k_that_stays_useful(acc, want):
    k, why = demo.choose_k(acc)
    assert k == want
    assert f"serving k = {want}" in why and "dense 0.700" in why
    assert ("no k keeps" in why) == (want == 2 and acc[2] < 0.63)


def test_held_out_accuracy_and_summary_read_the_commands_outputs(tmp_path, write_mask):
    masks = {k: write_mask(list(range(20, 20 + k)), task="demo", name=f"k{k}.json") for k in (2, 4)}
    (tmp_path / "eval.json").write_text(json.dumps({"results": [
        {"variant": "dense", "mask": None, "results": {"tabp_demo": {"acc,none": 0.75}}},
        {"variant": "k2", "mask": str(masks[2]), "results": {"tabp_demo": {
            "acc,none": 0.6875, "acc_stderr,none": 0.0832, "sample_len": 32}}},
        {"variant": "k4", "mask": str(masks[4]), "results": {"tabp_demo": {"acc,none": 0.5}}}]}))
    acc = demo.held_out_accuracy(tmp_path / "eval.json")
    assert acc == {None: 0.75, 2: 0.6875, 4: 0.5}
    (tmp_path / "bench.json").write_text(json.dumps({"comparison": {"speedups": [
        {"variant": "llama", "level": 4, "achieved_speedup": 1.0, "ideal_speedup": 1.0},
        {"variant": "llama-demo", "level": 4, "achieved_speedup": 1.041, "ideal_speedup": 1.07}]}}))
    line = demo.summary(masks[2], acc, tmp_path / "eval.json", tmp_path / "bench.json")
    assert "removes 2 of 30 blocks" in line  # the demo model's depth, read from the mask
    assert "0.688" in line and "0.750" in line
    assert "(92%; 32 questions; one standard error 0.083)" in line
    assert "1.041x" in line and "ideal 1.070x" in line


def test_variant_metrics_sum_counters_and_take_the_largest_gauge():
    from tabp_vllm.prometheus import parse

    text = "\n".join([
        "# TYPE ray_vllm_request_success_total counter",
        'ray_vllm_request_success_total{model_name="llama",finished_reason="stop",WorkerId="1"} 2',
        'ray_vllm_request_success_total{model_name="llama",finished_reason="length",WorkerId="1"} 3',
        'ray_vllm_request_success_total{finished_reason="stop"} 9',
        "# TYPE ray_tabp_variant_blocks_kept gauge",
        'ray_tabp_variant_blocks_kept{model_name="llama-demo",WorkerId="1"} 26',
        'ray_tabp_variant_blocks_kept{model_name="llama-demo",WorkerId="2"} 26',
        "# TYPE ray_tabp_routed_requests_total counter",
        'ray_tabp_routed_requests_total{routed_name="llama-auto",cluster="0",model_name="llama-demo"} 1',
        'ray_tabp_routed_requests_total{routed_name="llama-auto",cluster="1",model_name="llama-demo"} 1',
        "# TYPE ray_other gauge", 'ray_other{model_name="llama"} 1', ""])
    assert demo.variant_metrics(parse(text)) == {
        (demo.SUCCESS, "llama"): 5, (demo.BLOCKS_KEPT, "llama-demo"): 26,
        (demo.ROUTED_COUNT, "llama-demo"): 2}


def test_show_console_prints_the_table_through_ready(capsys):
    demo.show_console("dtype: float32\nlogs:      Ray's and vLLM's records go to x.log\n"
                      "ready: llama (1/2 variants, 40 s)\n"
                      "             tabp-vllm serve: llama (/models/llama)\n"
                      "┃ variant ┃\nmetrics:   http://127.0.0.1:8090/metrics\n"
                      "READY http://127.0.0.1:8000\nshutting down ...\n")
    out = capsys.readouterr().out.splitlines()
    assert "tabp-vllm serve: llama" in out[0] and out[-1] == "READY http://127.0.0.1:8000"


def test_the_demo_says_its_router_fit_is_short(tmp_path):
    import json

    router = tmp_path / "router.json"
    prov = {"wall_s": 41.2, "forward_passes": 300, "backward_passes": 192, "not_converged": [0, 1]}
    router.write_text(json.dumps({"provenance": prov}))
    note = demo.short_fit_note(router)
    assert f"short fit ({demo.DEMO_FIT_STEPS} steps" in note and "NOT converged (clusters 0, 1)" in note
    assert "41 s, 300 forward + 192 backward" in note
    router.write_text(json.dumps({"provenance": {**prov, "not_converged": []}}))
    assert "short fit" in demo.short_fit_note(router) and "NOT" not in demo.short_fit_note(router)
