"""Prefect tasks: thin wrappers around `croco.stages` adding retries, caching,
concurrency, artifacts and logging. Every task returns URI strings (a shard group:
`{"uri", "parts"}`, the shard files it wrote into that output)."""

from croco.tasks.stages import (  # noqa: F401
    STAGE_CACHE,
    configure_gpu_slots,
    ensure_gpu_limit,
    generate_group_task,
    generate_languages_task,
    generate_task,
    heldout_task,
    judge_task,
    manifest_task,
    pairs_task,
    plan_generate_task,
    prompts_task,
    report_task,
    reward_check_task,
    score_group_task,
    score_languages_task,
    score_task,
    seal_generate_task,
    seal_score_task,
    structured_task,
    train_task,
)
