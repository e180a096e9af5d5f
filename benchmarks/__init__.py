"""croco's benchmarks: each module builds A/B `Case`s (see `benchmarks.ab`) with
`cases(quick=False)`; `python -m benchmarks` runs them all and prints one table.
Each module also runs on its own: `python benchmarks/<module>.py`."""

#: The benchmark modules `python -m benchmarks` runs, in this order.
MODULES = ["generation_prefill", "reward_batching", "dpo_reference_logps", "pairing_scale",
           "pipeline_runs", "vllm_backends", "vllm_cpu"]
