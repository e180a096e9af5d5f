#!/usr/bin/env bash
# Create or update croco's Prefect work pools on the server at $PREFECT_API_URL.
#
#   PREFECT_API_URL=http://prefect-host:4200/api infra/work-pools/setup.sh
#
# Safe to rerun: every pool is written with --overwrite, so it ends up with the base job
# template in this directory (or the worker type's default) whatever it had before.
# Optional pool-wide caps on concurrent flow runs, one per pool; unset clears the cap:
#   CROCO_CPU_POOL_LIMIT, CROCO_GPU_POOL_LIMIT, CROCO_K8S_GPU_POOL_LIMIT,
#   CROCO_DOCKER_GPU_POOL_LIMIT, CROCO_SLURM_POOL_LIMIT
# Needs the prefect CLI (the dev environment or the croco images have it).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${PREFECT_API_URL:?set PREFECT_API_URL to the Prefect server API, e.g. http://prefect-host:4200/api}"
export PREFECT_API_URL

# <pool> <limit or empty>
pool_limit() {
    if [[ -n "$2" ]]; then
        prefect work-pool set-concurrency-limit "$1" "$2"
    else
        prefect work-pool clear-concurrency-limit "$1"
    fi
}

# The pipeline flow (flows/pipeline.py:croco_pipeline): CPU only, it waits on GPU stages.
prefect work-pool create croco-cpu --type process --overwrite
# GPU stage flows on GPU hosts, one worker per GPU (see below).
prefect work-pool create croco-gpu --type process --overwrite
# GPU stage flows as Kubernetes Jobs requesting nvidia.com/gpu.
prefect work-pool create croco-k8s-gpu --type kubernetes \
    --base-job-template "$here/kubernetes-gpu.json" --overwrite
# GPU stage flows as Docker containers with an NVIDIA device request.
prefect work-pool create croco-docker-gpu --type docker \
    --base-job-template "$here/docker-gpu.json" --overwrite

# GPU stage flows as Slurm batch jobs (worker type `slurm`, shipped by croco).
prefect work-pool create croco-slurm --type slurm \
    --base-job-template "$here/slurm.json" --overwrite

pool_limit croco-cpu "${CROCO_CPU_POOL_LIMIT:-}"
pool_limit croco-gpu "${CROCO_GPU_POOL_LIMIT:-}"
pool_limit croco-k8s-gpu "${CROCO_K8S_GPU_POOL_LIMIT:-}"
pool_limit croco-docker-gpu "${CROCO_DOCKER_GPU_POOL_LIMIT:-}"
pool_limit croco-slurm "${CROCO_SLURM_POOL_LIMIT:-}"

cat <<EOF

Work pools are ready on $PREFECT_API_URL. Start their workers:

croco-cpu (docker/compose.yaml runs one):
  prefect worker start --pool croco-cpu

croco-gpu: on each GPU host, one worker per GPU, each seeing only its GPU. --limit 1
means one flow run at a time per worker, that is per GPU:
  CUDA_VISIBLE_DEVICES=0 prefect worker start --pool croco-gpu --name "\$(hostname)-gpu0" --limit 1
  CUDA_VISIBLE_DEVICES=1 prefect worker start --pool croco-gpu --name "\$(hostname)-gpu1" --limit 1
  (a single-GPU host needs only the first line; export AWS_ACCESS_KEY_ID,
  AWS_SECRET_ACCESS_KEY and AWS_ENDPOINT_URL there first: flow runs inherit them)

croco-k8s-gpu: one worker anywhere with access to the cluster (pip install prefect-kubernetes):
  prefect worker start --pool croco-k8s-gpu --type kubernetes
  and the S3 credentials as a Secret in the jobs' namespace:
  kubectl create secret generic croco-s3 --from-literal=AWS_ACCESS_KEY_ID=... \\
      --from-literal=AWS_SECRET_ACCESS_KEY=... --from-literal=AWS_ENDPOINT_URL=...

croco-docker-gpu: on each GPU host with the NVIDIA Container Toolkit (pip install prefect-docker):
  prefect worker start --pool croco-docker-gpu --type docker --limit 1

croco-slurm: one worker on a login node, where sbatch/squeue/sacct work, with croco
installed (it provides the worker type) and the S3 variables exported (jobs inherit them):
  nohup prefect worker start --pool croco-slurm --type slurm >slurm-worker.log 2>&1 &

See infra/work-pools/README.md for the job variables of each pool.
EOF
