"""The `croco` command.

    croco run [CONFIG] [--set key=value ...] [--until prompts|generate|score|pair|train|evaluate]
    croco run [CONFIG] [--set ...] --deployment croco-pipeline/scale-out
    croco deploy [--name croco-pipeline/default ...]
    croco config show [CONFIG] [--set key=value ...]
    croco pairs show URI [--n 3]
    croco pairs build --scores URI --prompts SOURCE --out URI [--set pairing.KEY=VALUE ...]
    croco publish RUN_ID --dataset REPO [--models PREFIX] [--private/--public]

A mistake the user can fix (`croco.errors.UserError`: config, prompts, model paths, storage)
ends any command with one `error: ...` line on stderr and exit code 2; `croco run` finds
them before it starts Prefect or loads a model (`croco.preflight`). Anything else ends with
one line naming the exception and exit code 1. `--debug` (or CROCO_DEBUG=1) shows tracebacks.

The commands live here; the tables they print are `croco.flows.render`.
"""

from __future__ import annotations

import os

# A fresh ephemeral Prefect database needs more than the default 20 s on a small machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import functools  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from typing import Annotated, Optional  # noqa: E402

import click  # noqa: E402
import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402

from croco import storage  # noqa: E402
from croco.config import ConfigError  # noqa: E402
from croco.config_loading import dump_config, load_config  # noqa: E402
from croco.errors import root_outage, root_user_error  # noqa: E402
from croco.flows.render import (  # noqa: E402
    fmt,
    heldout_table,
    plan_table,
    stats_table,
    structured_table,
    winrate_table,
)

app = typer.Typer(help="CroCo: cross-lingual contrastive preference tuning on self-generations.",
                  no_args_is_help=True, add_completion=False)
config_app = typer.Typer(help="Inspect configurations.", no_args_is_help=True)
pairs_app = typer.Typer(help="Inspect pair sets.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(pairs_app, name="pairs")
console = Console(width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 120)

ConfigArg = Annotated[Optional[str], typer.Argument(help="YAML config (default: the demo)")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override, e.g. generation.k=8")]


_debug = os.environ.get("CROCO_DEBUG", "").lower() in ("1", "true", "yes", "on")


@app.callback()
def _options(debug: Annotated[bool, typer.Option(
        "--debug", envvar="CROCO_DEBUG",
        help="show tracebacks (default: one `error:` line; exit 2 bad input, 1 a failure)")]
        = False) -> None:
    global _debug
    _debug = _debug or debug


def _fail(message: str, code: int = 2) -> None:
    """End the command with exactly one `error: ...` line on stderr."""
    line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    # Escaped: messages hold brackets (experiments[dpo], lists) that are not Rich markup.
    err.print(f"[bold red]error:[/] {escape(storage.redact(line))}", highlight=False,
              soft_wrap=True)
    raise typer.Exit(code)


def _clean_errors(command):
    """Run a command; a user's mistake (anywhere in the exception's chain, as when Prefect
    re-raises a task's error) ends it with one line and exit 2, a bug with one line and
    exit 1. With --debug, every failure raises with its traceback."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.ClickException,
                click.exceptions.Abort):
            raise
        except Exception as e:  # noqa: BLE001 - every failure ends in one line
            user = root_user_error(e)
            if _debug:
                raise
            # The error line is the last word: no "stopping temporary server" after it.
            logging.getLogger("prefect").setLevel(logging.WARNING)
            if user is not None:
                _fail(str(user))
            outage = root_outage(e)
            if outage is not None:
                first = next((ln for ln in str(outage).splitlines() if ln.strip()), "")
                _fail(f"storage or network unreachable after the retries: {first}; everything "
                      "committed is kept, rerun the same command once it is back", code=1)
            first = next((ln for ln in str(e).splitlines() if ln.strip()), "")
            _fail(f"{type(e).__name__}: {first} (run with --debug for the traceback)", code=1)
    return wrapper


class _NoUserErrorTracebacks(logging.Filter):
    """Drops the traceback of a log record about a user's mistake, keeping its one-line
    message (Prefect logs a failed task and flow with the traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and root_user_error(record.exc_info[1]) is not None:
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_prefect_tracebacks() -> None:
    """Without --debug: no traceback for a UserError in Prefect's console logs."""
    if _debug:
        return
    quiet = _NoUserErrorTracebacks()
    names = [n for n in logging.root.manager.loggerDict if n.startswith("prefect")]
    for logger in [logging.getLogger(n) for n in names] + [logging.root]:
        for target in [logger, *logger.handlers]:
            if not any(isinstance(f, _NoUserErrorTracebacks) for f in target.filters):
                target.addFilter(quiet)


def _load(config: str | None, overrides: list[str] | None):
    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        _fail(str(e))


def _strings(value) -> set[str]:
    """Every string in a nested dict/list."""
    if isinstance(value, str):
        return {value}
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return set().union(*(_strings(v) for v in items)) if items else set()


def _preload(cfg, wanted: list[str] | None) -> None:
    """Do now, in the seconds `croco run` otherwise spends waiting for its temporary
    Prefect API to answer, what the run's later steps do on first use: convert the embedded
    models the config names (once per machine) and import the modules for reading Parquet
    through pyarrow's datasets and for the report's plots. The same work, earlier."""
    from croco.plan import last_stage, reaches

    last = last_stage(cfg, wanted)
    if reaches(last, "generate"):
        # An embedded model's one-time GGUF conversion (about 10 s for SmolLM2 on 2 cores),
        # on one core while the API boots on the other; then transformers is imported too.
        from croco.config import EMBEDDED_MODELS
        from croco.models import resolve_model

        for name in sorted(_strings(cfg.model_dump()) & set(EMBEDDED_MODELS)):
            resolve_model(name)
    if reaches(last, "pair"):
        import pyarrow.dataset  # noqa: F401 - pyarrow.parquet.read_table's first call
    if reaches(last, "evaluate") and cfg.evaluation.enabled:
        import matplotlib

        matplotlib.use("Agg")  # as the report sets it
        import matplotlib.pyplot

        import croco.evaluation.report  # noqa: F401


@app.command()
@_clean_errors
def run(config: ConfigArg = None, set_: SetOpt = None,
        until: Annotated[Optional[str], typer.Option(
            "--until", help="stop after this stage: prompts, generate, score, pair, train or "
                            "evaluate (default: the whole pipeline)")] = None,
        stages: Annotated[Optional[str], typer.Option(
            "--stages", hidden=True, help="older spelling of --until: stops after the latest "
                                          "of the listed stages")] = None,
        run_id: Annotated[Optional[str], typer.Option(help="name this run")] = None,
        deployment: Annotated[Optional[str], typer.Option(
            help="run on this pipeline deployment (e.g. croco-pipeline/scale-out) through the "
                 "Prefect API instead of in this process")] = None,
        wait: Annotated[bool, typer.Option(help="with --deployment: wait for the flow run "
                                                "to finish")] = True) -> None:
    """Run the pipeline (default: the demo on the embedded SmolLM2-135M-Instruct)."""
    from croco import preflight

    wanted = [until] if until else [s.strip() for s in stages.split(",")] if stages else None
    preflight.check_stages(wanted)
    cfg = _load(config, set_)
    if not deployment:
        # Every input, model path and the data root, before Prefect starts or a model loads
        # (a deployment's run reads them on its workers, which this machine cannot see).
        preflight.check(cfg, config_path=config, stages=wanted)
    from croco.flows.local import TemporaryAPI, run_until_stopped, wants_temporary_api

    api = None
    if not deployment and wants_temporary_api():
        api = TemporaryAPI().start()  # boots while the pipeline's modules import
    try:
        from croco.flows.pipeline import croco_pipeline, new_run_id

        _quiet_prefect_tracebacks()
        if deployment:
            params: dict = {"stages": wanted, "run_id": run_id}
            if config or set_:
                # The resolved config travels as the parameter (the worker need not see the
                # file), in place of the deployment's config_file; the deployment's own
                # overrides (e.g. scale-out's stage deployments) still apply on top.
                params.update(config=cfg.model_dump(mode="json"), config_file=None)
            _run_on_deployment(deployment, {k: v for k, v in params.items()
                                            if v is not None or k == "config_file"}, wait)
            return
        console.print(f"[bold]croco[/] run [cyan]{cfg.run_name}[/]: {len(cfg.languages)} "
                      f"languages ({', '.join(cfg.languages)}), policy {cfg.policy.model}, "
                      f"data in {storage.normalize_root(cfg.data_root)}")
        run_id = run_id or new_run_id()

        def stopping(signame: str) -> None:
            err.print(f"\n{signame}: stopping run {run_id}; finished shards and stages are "
                      "kept, the same command continues where it stopped", highlight=False)

        if api:
            _preload(cfg, wanted)  # while the temporary API is still booting
            api.wait_ready()
        result = run_until_stopped(
            lambda: croco_pipeline(config=cfg, stages=wanted, run_id=run_id),
            on_stop=stopping, api_url=api.url if api else "", flow_run_name=f"croco-{run_id}")
    finally:
        _release_engines()
        if api:
            api.stop()
    outputs = result["outputs"]
    if outputs.pairs:
        pairs_uri = outputs.pairs
        stats = storage.read_parquet(storage.join(pairs_uri, "stats.parquet"))
        console.print(stats_table(stats, f"pairs ({cfg.pairing.scope}, "
                                         f"{cfg.pairing.reject_target})"))
        console.print(f"DPO pairs: [green]{storage.join(pairs_uri, 'dpo')}[/]")
        console.print(f"SFT rows:  [green]{storage.join(pairs_uri, 'sft')}[/]")
    else:  # the last stage that ran
        last = next(name for name in ("scores", "generations", "prompts")
                    if getattr(outputs, name))
        for lang, uri in getattr(outputs, last).items():
            console.print(f"{last} {lang}: [green]{uri}[/]")
    for name, uri in outputs.training_runs().items():
        m = storage.read_json(storage.join(uri, "metrics.json"))
        acc = m.get("rewards/accuracies")
        console.print(
            f"trained [bold]{name}[/] ({m['method']}, {m.get('pairs_train', m.get('rows_train'))}"
            f" rows, {m.get('steps')} steps): loss {fmt(m.get('first_loss'))} -> "
            f"{fmt(m.get('final_loss'))}" + (f", reward accuracy {acc:.0%}" if acc is not None
                                             else "")
            + f"; adapter [green]{storage.join(uri, 'adapter')}[/]", highlight=False)
    ev = outputs.evaluation
    if ev is not None:
        console.print(heldout_table(storage.read_parquet(ev.heldout)))
    if ev is not None and ev.reward_check:
        acc = storage.read_parquet(storage.join(ev.reward_check, "accuracy.parquet"))
        console.print("reward check, ranking accuracy per language: " + ", ".join(
            f"{r['lang']} {r['accuracy']:.0%}" for r in acc.to_dicts()), highlight=False)
    if ev is not None and ev.structured:
        import polars as pl

        frames = []
        for name, uri in ev.structured.items():
            r = storage.read_parquet(storage.join(uri, "results.parquet"))
            frames.append(r.with_columns(pl.lit(name).alias("model")))
        console.print(structured_table(pl.concat(frames)))
    if ev is not None:
        for name, uri in ev.judgments.items():
            rates = storage.read_parquet(storage.join(uri, "win_rates.parquet"))
            console.print(winrate_table(rates, name))
    console.print(f"manifest:  [green]{result['manifest']}[/]")
    if result.get("report"):
        console.print(f"report:    [green]{result['report']}[/]")
    if result.get("published"):
        hub = result["published"]
        console.print(f"published: [green]{hub['dataset']}[/]"
                      + "".join(f", [green]{repo}[/]" for repo in hub["models"]))


def _release_engines() -> None:
    """Stop the vLLM engines the run started (if it started any) before the command
    prints and exits, not from finalizers while the interpreter shuts down."""
    engines = sys.modules.get("croco.generation.vllm")
    if engines is not None:
        engines.release_all()


def _run_on_deployment(name: str, params: dict, wait: bool) -> None:
    """Start a flow run of a pipeline deployment; with `wait`, follow it to its end."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_UI_URL

    if "/" not in name:
        name = f"croco-pipeline/{name}"
    try:
        flow_run = run_deployment(name, parameters=params, timeout=0, as_subflow=False)
    except Exception as e:  # noqa: BLE001 (the API's errors are many; all end the command)
        _fail(f"--deployment {name}: {type(e).__name__}: {e}", code=1)
    ui = PREFECT_UI_URL.value()
    console.print(f"flow run [bold]{flow_run.name}[/] ({flow_run.id}) of {name}"
                  + (f": {ui}/runs/flow-run/{flow_run.id}" if ui else ""), highlight=False)
    if not wait:
        return
    last = None
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(flow_run.id).state
            if state and state.name != last:
                console.print(f"  {state.name}", highlight=False)
                last = state.name
            if state and state.is_final():
                break
            time.sleep(3)
    if not state.is_completed():
        _fail(f"flow run {flow_run.name} ended {state.type.value}: "
              f"{state.message or 'see its logs in the UI'}", code=1)


@app.command()
@_clean_errors
def deploy(name: Annotated[Optional[list[str]], typer.Option(
               "--name", help="only these deployments, e.g. croco-pipeline/default")] = None,
           prefect_file: Annotated[str, typer.Option(help="deployment declarations")]
           = "infra/prefect.yaml",
           gpu_slots: Annotated[Optional[int], typer.Option(
               min=1, help="create or resize the global 'gpu' limit to this many slots (the "
                           "GPUs of every worker together; without it a missing limit is "
                           "created with 1); runs never resize it")] = None
           ) -> None:
    """Create or update croco's Prefect deployments (infra/prefect.yaml) on the current
    Prefect API (PREFECT_API_URL); the same as `prefect --no-prompt deploy --all
    --prefect-file infra/prefect.yaml` run from the project directory."""
    from croco.flows.deploy import PROJECT_DIR, deploy as run_deploy, missing_work_pools, work_pools

    if not (PROJECT_DIR / prefect_file).is_file():
        _fail(f"{PROJECT_DIR / prefect_file} not found: deploy from a croco checkout")
    missing = missing_work_pools(work_pools(prefect_file, name))
    if missing:  # prefect deploy would stop at the first one, half done
        _fail(f"no work pool {', '.join(missing)} on the Prefect API: create the pools first "
              "(PREFECT_API_URL=... infra/work-pools/setup.sh; croco-slurm is worker type "
              "'slurm', from croco), or deploy others with --name")
    rc = run_deploy(prefect_file, name)
    if rc:
        _fail(f"prefect deploy exited {rc}", code=rc)
    # The global limit exists before any stage run starts: runs that start together then
    # never race to create it (the loser's insert is a server error on PostgreSQL).
    from croco.tasks.stages import ensure_gpu_limit, resize_gpu_limit

    if gpu_slots is not None:
        resize_gpu_limit(gpu_slots)
        console.print(f"global 'gpu' concurrency limit: [bold]{gpu_slots}[/] slots")
    elif ensure_gpu_limit(1):
        console.print("global 'gpu' concurrency limit: created with [bold]1[/] slot; size it "
                      "to your GPUs with [cyan]croco deploy --gpu-slots N[/]")


@app.command()
@_clean_errors
def blocks(bucket: Annotated[str, typer.Option(help="the bucket croco's data lives in")],
           name: Annotated[str, typer.Option(help="block name")] = "croco",
           endpoint_url: Annotated[Optional[str], typer.Option(
               help="S3 endpoint (default: AWS_ENDPOINT_URL; none: AWS)")] = None,
           region: Annotated[Optional[str], typer.Option(help="AWS region")] = None,
           results_folder: Annotated[str, typer.Option(
               help="folder of the bucket for Prefect's results")] = "prefect-results") -> None:
    """Save Prefect blocks for a cluster from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY:
    aws-credentials/NAME (set the config's storage_block to it) and s3-bucket/NAME (set
    PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK to it on every worker)."""
    from croco.flows.deploy import create_storage_blocks

    try:
        slugs = create_storage_blocks(name, bucket, endpoint_url=endpoint_url, region=region,
                                      results_folder=results_folder)
    except (ImportError, ValueError) as e:
        _fail(str(e))
    console.print(f"saved [bold]{slugs['storage_block']}[/]: config "
                  f"[cyan]storage_block: {slugs['storage_block']}[/]", highlight=False)
    console.print(f"saved [bold]{slugs['result_storage']}[/] (s3://{bucket}/{results_folder}): "
                  f"workers [cyan]PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK="
                  f"{slugs['result_storage']}[/]", highlight=False)


@app.command()
@_clean_errors
def report(run_id: Annotated[str, typer.Argument(help="a run id (see <data_root>/runs/)")],
           data_root: Annotated[str, typer.Option(help="storage root")] = "./croco-data",
           render_again: Annotated[bool, typer.Option("--render/--no-render",
                                                      help="re-render from the stage outputs")]
           = True) -> None:
    """Print a run's report (re-rendered from its manifest by default)."""
    from rich.markdown import Markdown

    from croco.evaluation.report import load_run, render

    try:
        manifest = load_run(data_root, run_id)
    except FileNotFoundError as e:
        _fail(str(e))
    uri = storage.join(storage.normalize_root(data_root), "runs", run_id, "report.md")
    if render_again or not storage.exists(uri):
        uri = render(manifest, data_root)
    console.print(Markdown(storage.read_bytes(uri).decode()))
    console.print(f"report: [green]{uri}[/]")


@app.command()
@_clean_errors
def publish(run_id: Annotated[str, typer.Argument(help="a run id (see <data_root>/runs/)")],
            dataset: Annotated[str, typer.Option(
                help="dataset repository for the preference sets, e.g. my-org/croco-pairs")],
            models: Annotated[Optional[str], typer.Option(
                help="prefix of the model repositories: <prefix>-<variant> (default: the "
                     "dataset's id)")] = None,
            private: Annotated[bool, typer.Option(
                "--private/--public", help="visibility of the repositories")] = True,
            license: Annotated[str, typer.Option(
                help="license field of the cards (a Hub license id)")] = "unknown",
            data_root: Annotated[str, typer.Option(help="storage root")] = "./croco-data"
            ) -> None:
    """Publish a run on the Hugging Face Hub: its preference sets as one dataset (a config
    per scope, a split per language) and each variant's adapter as a model repository, with
    cards made from the run's manifest. Needs HF_TOKEN (or `hf auth login`); HF_ENDPOINT
    for another hub. Publishing the same run again uploads nothing."""
    from croco.publish import load_manifest, publish as publish_run

    manifest = load_manifest(data_root, run_id)
    done = publish_run(manifest, dataset=dataset, models=models, private=private,
                       license=license, log=lambda line: console.print(line, highlight=False,
                                                                       soft_wrap=True))
    new = sum(done.changed.values())
    console.print(f"published run {run_id}: dataset [green]{done.dataset}[/] and "
                  f"{len(done.models)} model repositories; {new} committed, "
                  f"{len(done.changed) - new} unchanged", highlight=False)


@app.command("train-rm")
@_clean_errors
def train_rm(preferences: Annotated[str, typer.Argument(help="JSONL/Parquet: prompt, chosen, "
                                                           "rejected")],
             base: Annotated[str, typer.Option(help="base model id or path")],
             out: Annotated[str, typer.Option(help="output URI (a folder)")],
             config: Annotated[Optional[str], typer.Option(help="YAML for training.*")] = None,
             set_: SetOpt = None) -> None:
    """Train a reward model (TRL RewardTrainer, one label) on English preference pairs; use
    the result as a `classifier` scorer: reward.scorers: [{type: classifier, model: OUT/model}]."""
    from croco.training.reward_model import load_preferences, train_reward_model

    cfg = _load(config, set_)
    try:
        prefs = load_preferences(preferences)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e), code=1)
    metrics = train_reward_model(prefs, base=base, cfg=cfg.training, out_uri=out)
    storage.write_json(storage.join(out, "metrics.json"), metrics)
    console.print(f"reward model: [green]{storage.join(out, 'model')}[/] "
                  f"(loss {fmt(metrics.get('first_loss'))} -> {fmt(metrics.get('final_loss'))})")


@config_app.command("show")
@_clean_errors
def config_show(config: ConfigArg = None, set_: SetOpt = None) -> None:
    """Print the resolved config (defaults filled in, overrides applied)."""
    cfg = _load(config, set_)
    sys.stdout.write(dump_config(cfg))


@config_app.command("plan")
@_clean_errors
def config_plan(config: ConfigArg = None, set_: SetOpt = None) -> None:
    """What `croco run` would do with this config, without running anything: each stage's
    outputs, and how many are already complete under data_root (read back) or would be
    computed. A changed batch size or device computes nothing; see
    docs/what-a-change-reruns.md."""
    from croco import storage
    from croco.plan import STAGES, output_uris

    cfg = _load(config, set_)
    outputs = output_uris(cfg)
    done = storage.complete_among([uri for _, uri in outputs])  # one listing an output
    by_stage: dict[str, list[bool]] = {}
    for stage, uri in outputs:
        by_stage.setdefault(stage, []).append(uri in done)
    console.print(plan_table(by_stage, [s.name for s in STAGES], cfg.data_root))


@pairs_app.command("show")
@_clean_errors
def pairs_show(uri: Annotated[str, typer.Argument(help="a pairs output URI")],
               n: Annotated[int, typer.Option(help="pairs to print")] = 3) -> None:
    """Print a few pairs and the per-language stats of a pair set."""
    dpo_uri = storage.join(uri, "dpo") if storage.exists(storage.join(uri, "dpo")) else uri
    try:
        pairs = storage.read_parquet(dpo_uri)
    except FileNotFoundError:
        _fail(f"{uri}: no pairs found (expected a pairs/<key> folder written by croco run)")
    for row in pairs.head(n).to_dicts():
        console.rule(f"{row['prompt_id']} [{row['prompt_lang']}] pool of {row['pool_size']}")
        console.print(f"[bold]prompt[/]: {row['prompt']}", highlight=False)
        console.print(f"[green]chosen[/] ({row['chosen_lang']}, {row['chosen_score']:.3f}): "
                      f"{row['chosen']}", highlight=False)
        console.print(f"[red]rejected[/] ({row['rejected_lang']}, {row['rejected_score']:.3f}): "
                      f"{row['rejected']}", highlight=False)
    stats_uri = storage.join(uri, "stats.parquet")
    if storage.exists(stats_uri):
        console.print(stats_table(storage.read_parquet(stats_uri), f"{pairs.height} pairs"))


@pairs_app.command("build")
@_clean_errors
def pairs_build(scores: Annotated[str, typer.Option(
                    "--scores", help="scored set: a folder or glob of Parquet with prompt_id, "
                                     "lang (or lang=xx folders), sample_idx, response, reward")],
                prompts: Annotated[str, typer.Option(
                    "--prompts", help="prompt source, as prompts.path: JSONL/Parquet file or "
                                      "folder")],
                out: Annotated[str, typer.Option("--out", help="output folder (new or empty)")],
                set_: Annotated[Optional[list[str]], typer.Option(
                    "--set", help="pairing override, e.g. pairing.scope=all_lang")] = None) -> None:
    """Run the pair stage on a scored set made by an earlier run or elsewhere; writes dpo/,
    sft/, pools.parquet, stats.parquet and _SUCCESS under --out."""
    import polars as pl

    from croco.pairs_io import build

    bad = [s for s in set_ or [] if not s.startswith("pairing.")]
    if bad:
        _fail(f"--set {bad[0]}: pairs build takes pairing.* settings only")
    cfg = _load(None, set_)
    try:
        sets = build(scores, prompts, cfg.pairing, out)
    except (ValueError, FileNotFoundError, pl.exceptions.PolarsError) as e:
        _fail(str(e))  # the scored set or the prompts: bad input
    console.print(stats_table(sets.stats, f"{sets.dpo.height} pairs ({cfg.pairing.scope}, "
                                          f"{cfg.pairing.reject_target})"))
    console.print(f"DPO pairs: [green]{storage.join(out, 'dpo')}[/]")
    console.print(f"SFT rows:  [green]{storage.join(out, 'sft')}[/]")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
